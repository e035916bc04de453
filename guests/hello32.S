/* hello32: ELF32 (ELFCLASS32) for flat 32-bit protected mode, linked at 1 MiB.
 * Prints "hello32\r\n" on COM1 (polling LSR.THRE), then cli; hlt (exit status 0). */
        .code32
        .text
        .globl  _start
_start:
        mov     $msg, %esi
        mov     $0x3f8, %dx
        call    uart_init32
1:      lodsb
        test    %al, %al
        jz      2f
        call    putc32
        jmp     1b
2:      cli
        hlt
        jmp     2b

uart_init32:
        mov     $0x3fb, %dx
        mov     $0x03, %al
        out     %al, %dx
        mov     $0x3f9, %dx
        xor     %al, %al
        out     %al, %dx
        ret

putc32:
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
msg:    .asciz  "hello32\r\n"
