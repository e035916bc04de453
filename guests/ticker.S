/* ticker: raw boot sector (real mode). Prints "tick\r\n" on COM1 forever, polling LSR
 * before each byte; it never ends by itself. Used to watch a device go away and come
 * back: while the server is gone, LSR reads all ones (THR empty) and the bytes are
 * dropped, so the guest keeps running instead of waiting for a transmitter. */
        .code16
        .include "boot16.inc"
        .text
        .globl  _start
_start:
        boot16
        call    uart_init
again:
        mov     $msg, %si
        call    puts
        jmp     again

        .include "uart16.inc"

msg:    .asciz  "tick\r\n"
