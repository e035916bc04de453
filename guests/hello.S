/* hello: raw boot sector (real mode, loaded at 0x7c00).
 * Prints "Hello from remote-hw guest\r\n" on COM1, then cli; hlt (exit status 0). */
        .code16
        .include "boot16.inc"
        .text
        .globl  _start
_start:
        boot16
        call    uart_init
        mov     $msg, %si
        call    puts
halt:
        cli
        hlt
        jmp     halt

        .include "uart16.inc"

msg:    .asciz  "Hello from remote-hw guest\r\n"
