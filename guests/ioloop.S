/* ioloop: raw boot sector (real mode) for benchmarks and exit-path tests.
 *
 * Patchable parameters (little-endian dwords at fixed offsets in the image; the image
 * is loaded at 0x7c00, so guest address = 0x7c00 + offset):
 *   offset  4  count  number of accesses (default 100000; 0 = none)
 *   offset  8  port   I/O port (low 16 bits; default 0x3ff, COM1 scratch)
 *   offset 12  mode   0: `in al, dx` count times
 *                     1: `out dx, al` count times (al = value)
 *                     2: string I/O: `rep insb` count bytes (at most 0x6000) from port
 *                        into 0x1000, then `rep outsb` the same bytes back to port
 *                     3: `out dx, al` count times, al = value, value + 1, ... (mod 256):
 *                        a byte stream in which a lost or a doubled byte shows
 *   offset 16  value  byte written in mode 1 and initial al
 * Then it writes al to the debug-exit port 0xf4, so the exit status is
 * (al << 1) | 1 with al = the last byte read (modes 0 and 2; value if count is 0) or
 * value (mode 1). */
        .code16
        .include "boot16.inc"
        .text
        .globl  _start
_start:
        jmp     main
        .balign 4, 0
count:  .long   100000
port:   .long   0x3ff
mode:   .long   0
value:  .long   0
main:
        boot16
        mov     count, %ecx
        mov     port, %dx
        mov     value, %al
        cmpl    $1, mode
        je      outs
        cmpl    $2, mode
        je      strs
        cmpl    $3, mode
        je      seq
        test    %ecx, %ecx
        jz      done
1:      in      %dx, %al
        dec     %ecx
        jnz     1b
        jmp     done
outs:
        test    %ecx, %ecx
        jz      done
2:      out     %al, %dx
        dec     %ecx
        jnz     2b
        jmp     done
seq:
        test    %ecx, %ecx
        jz      done
4:      out     %al, %dx
        inc     %al
        dec     %ecx
        jnz     4b
        jmp     done
strs:
        test    %ecx, %ecx
        jz      done
        cmp     $0x6000, %ecx
        jbe     3f
        mov     $0x6000, %ecx
3:      push    %cx
        mov     $0x1000, %di
        rep insb
        pop     %cx
        mov     %cx, %bx
        mov     $0x1000, %si
        rep outsb
        mov     0x0fff(%bx), %al        /* last byte transferred */
done:
        out     %al, $0xf4
        cli
        hlt
        jmp     done
