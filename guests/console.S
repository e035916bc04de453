/* console: raw boot sector (real mode) printing a byte stream on COM1 the way Linux's
 * 8250 console does it per byte: poll LSR (0x3fd) until THRE (bit 5) is set, then
 * write the next byte of a buffer to THR (0x3f8). For bench/console.py.
 *
 * Patchable parameters (little-endian dwords at fixed offsets in the image; loaded at
 * 0x7c00, so guest address = 0x7c00 + offset):
 *   offset  4  count  bytes to print (default 1024; 0 = none)
 *   offset  8  seed   state of the xorshift32 generator (default 0x12345678; must not
 *                     be 0)
 * Steps: set the UART up as Linux leaves it for a polled console (LCR = 8N1, IER = 0,
 * FCR = FIFO on); fill the 64 KiB buffer at 0x10000 with min(count, 65536) bytes, each
 * the low byte of the next xorshift32 state (x ^= x << 13; x ^= x >> 17;
 * x ^= x << 5), so a lost, doubled or reordered byte shows anywhere; then print count
 * bytes from the buffer (byte i is buffer[i mod 65536]), so the printing loop does no
 * more than a console's: poll, load, write. After the last byte the guest writes 0x2a
 * to the debug-exit port 0xf4: exit status (0x2a << 1) | 1 = 0x55. */
        .code16
        .include "boot16.inc"
        .text
        .globl  _start
_start:
        jmp     main
        .balign 4, 0
count:  .long   1024
seed:   .long   0x12345678
        .set    BUF_SEG, 0x1000
main:
        boot16
        call    uart_init
        mov     count, %ecx
        test    %ecx, %ecx
        jz      done
        mov     seed, %ebx
        cmp     $0x10000, %ecx          /* fill min(count, 65536) bytes */
        jbe     1f
        mov     $0x10000, %ecx
1:      mov     $BUF_SEG, %ax
        mov     %ax, %es
        xor     %di, %di
fill:
        mov     %ebx, %eax              /* xorshift32 */
        shl     $13, %eax
        xor     %eax, %ebx
        mov     %ebx, %eax
        shr     $17, %eax
        xor     %eax, %ebx
        mov     %ebx, %eax
        shl     $5, %eax
        xor     %eax, %ebx
        mov     %bl, %al
        stosb
        dec     %ecx
        jnz     fill
        mov     count, %ecx
        mov     $BUF_SEG, %ax
        mov     %ax, %ds                /* ds:si walks the buffer, wrapping at 64 KiB */
        xor     %si, %si
        mov     $COM1_LSR, %bx
next:
        mov     %bx, %dx
2:      in      %dx, %al                /* wait for THRE */
        test    $0x20, %al
        jz      2b
        lodsb
        mov     $COM1, %dx
        out     %al, %dx                /* THR */
        dec     %ecx
        jnz     next
done:
        mov     $0x2a, %al
        out     %al, $DEBUG_EXIT
        cli
        hlt
        jmp     done

        .include "uart16.inc"
