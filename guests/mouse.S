/* mouse: raw boot sector (real mode). Checks that the i8042's two interrupt lines
 * reach the guest as two IRQs: the keyboard's as IRQ 1 and the aux (mouse) port's as
 * IRQ 12, routed by the client from the line number each INTERRUPT carries.
 *
 * Programs the 8259 pair (master: IRQ1 and the cascade IRQ2 unmasked; slave: IRQ12
 * unmasked), points vector 9 (IRQ1) and vector 0x74 (IRQ12) at two ISRs, empties the
 * controller, enables the aux port (0xA8), writes the command byte 0x43 (translation,
 * both interrupts on, both ports enabled) and sends "enable data reporting" (0xF4) to
 * the mouse through 0xD4. The mouse answers 0xFA on the aux port: that byte must
 * arrive by IRQ 12. Results through the debug-exit port 0xf4 (status = v << 1 | 1):
 *   v = 12: IRQ 12 came with the aux byte 0xFA (the pass)
 *   v = 1:  IRQ 1 came (the aux byte arrived on the keyboard's line)
 *   v = 13: IRQ 12 came but the byte was not the aux ACK (v = 14: not an aux byte) */
        .code16
        .include "boot16.inc"
        .text
        .globl  _start
_start:
        boot16

        pic_init 0xf9                   /* master: IRQ1 and IRQ2 (cascade) unmasked */
        mov     $0xef, %al              /* slave: IRQ12 (its input 4) unmasked */
        out     %al, $0xa1

        movw    $isr_kbd, 0x24          /* vector 9 at 9*4 */
        movw    $0, 0x26
        movw    $isr_aux, 0x1d0         /* vector 0x74 at 0x74*4 */
        movw    $0, 0x1d2

flush:
        in      $0x64, %al
        test    $0x01, %al
        jz      1f
        in      $0x60, %al
        jmp     flush
1:      call    kbc_wait
        mov     $0xa8, %al              /* enable the aux port */
        out     %al, $0x64
        call    kbc_wait
        mov     $0x60, %al              /* write command byte */
        out     %al, $0x64
        call    kbc_wait
        mov     $0x43, %al              /* XLAT | aux interrupt | keyboard interrupt */
        out     %al, $0x60
        call    kbc_wait
        mov     $0xd4, %al              /* next data byte goes to the aux device */
        out     %al, $0x64
        call    kbc_wait
        mov     $0xf4, %al              /* mouse: enable data reporting (answers 0xFA) */
        out     %al, $0x60
idle:
        sti
        hlt
        jmp     idle

/* kbc_wait: until the controller's input buffer is empty (status bit 1). */
kbc_wait:
        in      $0x64, %al
        test    $0x02, %al
        jnz     kbc_wait
        ret

isr_kbd:
        mov     $1, %al
        out     %al, $0xf4

isr_aux:
        in      $0x64, %al
        mov     %al, %ah
        in      $0x60, %al
        test    $0x20, %ah              /* status bit 5: the byte is from the aux port */
        jz      not_aux
        cmp     $0xfa, %al
        jne     not_ack
        mov     $12, %al
        out     %al, $0xf4
not_ack:
        mov     $13, %al
        out     %al, $0xf4
not_aux:
        mov     $14, %al
        out     %al, $0xf4
