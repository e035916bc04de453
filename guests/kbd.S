/* kbd: raw boot sector (real mode). Keys from the remote PS/2 keyboard, by IRQ 1,
 * echoed as text on the remote COM1.
 *
 * Programs the 8259 pair (master vectors 0x08-0x0f, slave 0x70-0x77, all masked but
 * IRQ1), points IVT vector 9 (IRQ1) at its ISR, empties the i8042's output buffer and
 * writes the command byte 0x61 (translation to scan code set 1, aux port disabled,
 * keyboard port enabled, keyboard interrupt on), prints "kbd ready\r\n" and idles in
 * `sti; hlt`. The ISR reads every byte the controller holds (status bit 0, data from
 * port 0x60), ignores break codes, 0xE0 prefixes and aux bytes, and prints the ASCII
 * of letters, digits and space (Enter prints "\r\n"), then sends EOI.
 * Escape prints "bye\r\n" and ends with `cli; hlt` (exit status 0). */
        .code16
        .include "boot16.inc"
        .text
        .globl  _start
_start:
        boot16

        pic_init 0xfd                   /* 8259 PICs: unmask IRQ1 only */

        /* IVT entry for vector 9 (IRQ1) at 9*4 */
        movw    $isr, 0x24
        movw    $0, 0x26

        call    uart_init

        /* i8042: drop anything waiting, then command byte 0x61 */
flush:
        in      $0x64, %al
        test    $0x01, %al
        jz      1f
        in      $0x60, %al
        jmp     flush
1:      call    kbc_wait
        mov     $0x60, %al              /* write command byte */
        out     %al, $0x64
        call    kbc_wait
        mov     $0x61, %al              /* XLAT | aux disabled | keyboard interrupt */
        out     %al, $0x60

        mov     $ready, %si
        call    puts
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

isr:
        push    %ax
        push    %bx
        push    %si
next:
        in      $0x64, %al
        test    $0x01, %al              /* output buffer full? */
        jz      eoi
        mov     %al, %ah
        in      $0x60, %al
        test    $0x20, %ah              /* aux (mouse) byte: not ours */
        jnz     next
        test    $0x80, %al              /* break codes (and 0xE0, 0xFA, ...) */
        jnz     next
        cmp     $0x01, %al              /* Escape */
        je      bye
        cmp     $0x1c, %al              /* Enter */
        je      enter
        cmp     $(table_end - table), %al
        jae     next
        xor     %bx, %bx
        mov     %al, %bl
        mov     table(%bx), %al
        test    %al, %al
        jz      next
        call    putc
        jmp     next
enter:
        mov     $crlf, %si
        call    puts
        jmp     next
eoi:
        mov     $0x20, %al
        out     %al, $0x20
        pop     %si
        pop     %bx
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

/* Set-1 make code -> ASCII (0: not printed), for codes 0x00-0x39. */
table:
        .byte   0, 0, '1', '2', '3', '4', '5', '6', '7', '8', '9', '0', 0, 0, 0, 0
        .byte   'q', 'w', 'e', 'r', 't', 'y', 'u', 'i', 'o', 'p', 0, 0, 0, 0, 'a', 's'
        .byte   'd', 'f', 'g', 'h', 'j', 'k', 'l', 0, 0, 0, 0, 0, 'z', 'x', 'c', 'v'
        .byte   'b', 'n', 'm', 0, 0, 0, 0, 0, 0, ' '
table_end:

ready:  .asciz  "kbd ready\r\n"
crlf:   .asciz  "\r\n"
byemsg: .asciz  "bye\r\n"
