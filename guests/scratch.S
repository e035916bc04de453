/* scratch: raw boot sector (real mode). Runs the sample plugins of
 * samples/remote-hw-sample through a real server:
 *   the scratch device (remote_hw_sample.scratch) at ports 0x300-0x309, and
 *   a 16550 at COM1 whose backend is the echo backend (remote_hw_sample.echo).
 * Steps; a failing step n writes 0x10 + n to the debug-exit port 0xf4 (exit status
 * ((0x10 + n) << 1) | 1: 35 for step 1, 37 for step 2, ...):
 *   1  the ID register (0x308) reads 0xa5
 *   2  "scratch!" written to 0x300-0x307 one byte at a time reads back the same way
 *   3  inw 0x300 reads "sc", inl 0x304 reads "tch!" (wide reads split into bytes)
 *   4  outw "OK" to 0x306 (a wide write split into bytes): 0x306, 0x307 read 'O', 'K'
 *   5  SUM (0x309) reads the sum of "scratcOK" modulo 256
 *   6  'E' sent on COM1 comes back through the echo backend (LSR.DR within a bounded
 *      number of polls, then RBR reads 'E')
 * All passed: 0x2a to port 0xf4, exit status 85. The scratch registers are left
 * holding "scratcOK", which tests/test_plugins.py reads on the server side. */
        .code16
        .include "boot16.inc"
        .set    SCRATCH, 0x300
        .set    SCRATCH_ID, SCRATCH + 8
        .set    SCRATCH_SUM, SCRATCH + 9
        .set    ECHO_POLLS, 60000
        .text
        .globl  _start
_start:
        boot16
        call    uart_init

        mov     $1, %bl                 /* 1: the ID register */
        mov     $SCRATCH_ID, %dx
        in      %dx, %al
        cmp     $0xa5, %al
        jne     fail

        mov     $2, %bl                 /* 2: byte writes, byte reads */
        mov     $pattern, %si
        mov     $SCRATCH, %dx
        mov     $8, %cx
1:      lodsb
        out     %al, %dx
        inc     %dx
        loop    1b
        mov     $pattern, %si
        mov     $SCRATCH, %dx
        mov     $8, %cx
2:      in      %dx, %al
        cmp     (%si), %al
        jne     fail
        inc     %si
        inc     %dx
        loop    2b

        mov     $3, %bl                 /* 3: 16- and 32-bit reads */
        mov     $SCRATCH, %dx
        in      %dx, %ax
        cmp     pattern, %ax
        jne     fail
        mov     $SCRATCH + 4, %dx
        in      %dx, %eax
        cmp     pattern + 4, %eax
        jne     fail

        mov     $4, %bl                 /* 4: a 16-bit write */
        mov     $SCRATCH + 6, %dx
        mov     final + 6, %ax
        out     %ax, %dx
        in      %dx, %al
        cmp     $'O', %al
        jne     fail
        inc     %dx
        in      %dx, %al
        cmp     $'K', %al
        jne     fail

        mov     $5, %bl                 /* 5: SUM = the sum of the final registers */
        mov     $final, %si
        mov     $8, %cx
        xor     %ah, %ah
3:      lodsb
        add     %al, %ah
        loop    3b
        mov     $SCRATCH_SUM, %dx
        in      %dx, %al
        cmp     %ah, %al
        jne     fail

        mov     $6, %bl                 /* 6: a byte through the echo backend */
        mov     $'E', %al
        call    putc
        mov     $COM1_LSR, %dx
        mov     $ECHO_POLLS, %cx
4:      in      %dx, %al
        test    $0x01, %al              /* LSR.DR */
        jnz     5f
        loop    4b
        jmp     fail
5:      mov     $COM1, %dx
        in      %dx, %al
        cmp     $'E', %al
        jne     fail

        mov     $0x2a, %al              /* all passed: exit status 85 */
        out     %al, $DEBUG_EXIT
halt:
        cli
        hlt
        jmp     halt

fail:   mov     %bl, %al
        add     $0x10, %al
        out     %al, $DEBUG_EXIT
        jmp     halt

        .include "uart16.inc"

pattern: .ascii "scratch!"
final:  .ascii  "scratcOK"
