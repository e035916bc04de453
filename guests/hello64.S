/* hello64: ELF64 (ELFCLASS64) for 64-bit long mode, linked at 1 MiB.
 * Prints "hello64\r\n" on COM1 (polling LSR.THRE), then cli; hlt (exit status 0). */
        .code64
        .text
        .globl  _start
_start:
        lea     msg(%rip), %rsi
        mov     $0x3fb, %dx
        mov     $0x03, %al
        out     %al, %dx
        mov     $0x3f9, %dx
        xor     %eax, %eax
        out     %al, %dx
1:      lodsb
        test    %al, %al
        jz      2f
        call    putc64
        jmp     1b
2:      cli
        hlt
        jmp     2b

putc64:
        mov     %al, %ah
        mov     $0x3fd, %dx
1:      in      %dx, %al
        test    $0x20, %al
        jz      1b
        mov     $0x3f8, %dx
        mov     %ah, %al
        out     %al, %dx
        ret

        .section .rodata
msg:    .asciz  "hello64\r\n"
