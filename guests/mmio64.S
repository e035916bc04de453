/* mmio64: ELF64 long-mode guest exercising MMIO exits at 0xd0000000 (above RAM,
 * reachable through the loader's 4 GiB identity map), then debug-exit.
 *   q  = readq(B+0x00);  writeq(B+0x08, q + 1)
 *   l  = readl(B+0x10);  writel(B+0x14, l ^ 0xffffffff)
 *   w  = readw(B+0x18);  writew(B+0x1a, w)
 *   b  = readb(B+0x1c);  writeb(B+0x1d, b)
 *   u  = readl(0xe0000000)  (expected unmapped: all ones); writel(B+0x20, u)
 * then writes 0x2a to port 0xf4: exit status 0x55. */
        .code64
        .text
        .globl  _start
        .set    BASE, 0xd0000000
_start:
        mov     $BASE, %ebx
        mov     0x00(%rbx), %rax
        inc     %rax
        mov     %rax, 0x08(%rbx)
        mov     0x10(%rbx), %eax
        not     %eax
        mov     %eax, 0x14(%rbx)
        mov     0x18(%rbx), %ax
        mov     %ax, 0x1a(%rbx)
        mov     0x1c(%rbx), %al
        mov     %al, 0x1d(%rbx)
        mov     $0xe0000000, %ecx
        mov     (%rcx), %eax
        mov     %eax, 0x20(%rbx)
        mov     $0x2a, %al
        out     %al, $0xf4
1:      cli
        hlt
        jmp     1b
