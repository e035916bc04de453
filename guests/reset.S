/* reset: raw boot sector (real mode). Resets the machine through the i8042.
 *
 * Each boot prints "boot N\r\n" on COM1, where N counts the boots in COM1's scratch
 * register (offset 7): the register lives in the server's UART model, which the
 * client's VM reset does not touch, so the count survives the restart. Boot 0 then
 * writes 0xFE to port 0x64 (pulse the reset line) and spins until the VM is reset;
 * the next boot prints "done\r\n" and ends with `cli; hlt` (exit status 0). */
        .code16
        .include "boot16.inc"
        .text
        .globl  _start
        .set    COM1_SCR, 0x3ff
_start:
        boot16

        call    uart_init
        mov     $COM1_SCR, %dx
        in      %dx, %al                /* boots so far */
        mov     %al, %bl
        inc     %al
        out     %al, %dx
        mov     $bootmsg, %si
        call    puts
        mov     %bl, %al
        add     $'0', %al
        call    putc
        mov     $crlf, %si
        call    puts
        test    %bl, %bl
        jnz     finish
        mov     $0xfe, %al              /* pulse output port bit 0: CPU reset */
        out     %al, $0x64
spin:
        jmp     spin                    /* the reset takes the CPU away from here */
finish:
        mov     $donemsg, %si
        call    puts
        cli
        hlt
        jmp     finish

        .include "uart16.inc"

bootmsg: .asciz "boot "
crlf:    .asciz "\r\n"
donemsg: .asciz "done\r\n"
