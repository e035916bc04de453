/* echo: raw boot sector (real mode). Interrupt-driven COM1 echo.
 *
 * Programs the 8259 pair itself (ICW1..ICW4: master vectors 0x08-0x0f, slave
 * 0x70-0x77, all masked but IRQ4), points IVT vector 0x0c (IRQ4) at its ISR, enables
 * the UART's received-data interrupt (IER=0x01) and OUT2 (MCR=0x0b: DTR|RTS|OUT2, OUT2
 * gates the IRQ on a PC), prints "echo ready\r\n" and then idles in `sti; hlt`.
 * The ISR drains the receiver (LSR bit 0 / RBR), writes each byte back to THR
 * (polling LSR.THRE), sends a non-specific EOI and irets.
 * On byte 0x04 (Ctrl-D) it prints "bye\r\n" and ends with `cli; hlt` (exit status 0). */
        .code16
        .include "boot16.inc"
        .text
        .globl  _start
_start:
        boot16

        pic_init 0xef                   /* 8259 PICs: unmask IRQ4 only */

        /* IVT entry for vector 0x0c (IRQ4) at 0x0c*4 */
        movw    $isr, 0x30
        movw    $0, 0x32

        call    uart_init
        mov     $COM1_MCR, %dx
        mov     $0x0b, %al              /* DTR | RTS | OUT2 */
        out     %al, %dx
        mov     $ready, %si
        call    puts
        mov     $COM1_IER, %dx
        mov     $0x01, %al              /* received-data-available interrupt */
        out     %al, %dx
idle:
        sti
        hlt
        jmp     idle

isr:
        push    %ax
        push    %dx
        push    %si
rx:
        mov     $COM1_LSR, %dx
        in      %dx, %al
        test    $0x01, %al              /* data ready? */
        jz      eoi
        mov     $COM1, %dx
        in      %dx, %al                /* RBR */
        cmp     $0x04, %al
        je      bye
        call    putc
        jmp     rx
eoi:
        mov     $0x20, %al
        out     %al, $0x20
        pop     %si
        pop     %dx
        pop     %ax
        iret
bye:
        mov     $byemsg, %si
        call    puts
done:
        cli
        hlt
        jmp     done

        .include "uart16.inc"

ready:  .asciz  "echo ready\r\n"
byemsg: .asciz  "bye\r\n"
