/* coalesce: raw boot sector (real mode) for the coalesced I/O ring's tests.
 *
 * A stream of byte writes value, value + 1, ... (mod 256) to one port or one MMIO byte,
 * then a "fence": a non-coalesced OUT and IN on another port, or a spin with no exit.
 * Patchable parameters (little-endian dwords at fixed offsets in the image; loaded at
 * 0x7c00, so guest address = 0x7c00 + offset):
 *   offset  4  count  number of writes (default 16; 0 = none)
 *   offset  8  port   port written (modes 0 and 1; low 16 bits; default 0x520)
 *   offset 12  mode   0: count × `out dx, al` to port, then the fence
 *                     1: count × `out dx, al` to port, then spin forever (`jmp .`):
 *                        after the writes, the guest never exits by itself
 *                     2: count × `mov es:0, al` with es = seg (one MMIO byte at
 *                        seg << 4), then the fence
 *   offset 16  value  first byte written
 *   offset 20  fence  fence port (low 16 bits; default 0x521)
 *   offset 24  seg    real-mode segment of the MMIO byte (mode 2; default 0xa000)
 * The fence: `out dx, al` to fence with al = value + count (mod 256), then `in al, dx`
 * from fence, then al to the debug-exit port 0xf4: exit status (al << 1) | 1 with al
 * the byte the IN read. */
        .code16
        .include "boot16.inc"
        .text
        .globl  _start
_start:
        jmp     main
        .balign 4, 0
count:  .long   16
port:   .long   0x520
mode:   .long   0
value:  .long   0
fence:  .long   0x521
seg:    .long   0xa000
main:
        boot16
        mov     count, %ecx
        mov     value, %al
        cmpl    $2, mode
        je      mmio
        mov     port, %dx
        test    %ecx, %ecx
        jz      after
1:      out     %al, %dx
        inc     %al
        dec     %ecx
        jnz     1b
after:
        cmpl    $1, mode
        jne     fenced
spin:   jmp     spin
mmio:
        mov     seg, %bx
        mov     %bx, %es
        test    %ecx, %ecx
        jz      fenced
2:      movb    %al, %es:0
        inc     %al
        dec     %ecx
        jnz     2b
fenced:
        mov     fence, %dx
        out     %al, %dx
        in      %dx, %al
done:
        out     %al, $0xf4
        cli
        hlt
        jmp     done
