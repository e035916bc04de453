/* rtc: raw boot sector (real mode). Reads the CMOS clock through ports 0x70/0x71 and
 * prints "RTC CCYY-MM-DD HH:MM:SS\r\n" (century from CMOS register 0x32), then
 * cli; hlt (exit status 0).
 * Waits while register A bit 7 (UIP) is set; register B bit 2 selects binary (else
 * BCD), bit 1 24-hour mode (else 12-hour with bit 7 of the hour = PM). A century
 * register reading 0 or 0xff (absent) counts as 20. */
        .code16
        .include "boot16.inc"
        .text
        .globl  _start
_start:
        boot16
        call    uart_init

uip:    mov     $0x0a, %al
        call    cmos
        test    $0x80, %al
        jnz     uip
        mov     $0x0b, %al
        call    cmos
        mov     %al, regb

        mov     $0x32, %al              /* century */
        call    cmos
        cmp     $0x00, %al
        je      1f
        cmp     $0xff, %al
        jne     2f
1:      mov     $0x20, %al              /* absent: BCD 20 (converted below if binary) */
        testb   $0x04, regb
        jz      2f
        mov     $20, %al
2:      call    tobin
        mov     %al, century

        mov     $msg, %si
        call    puts
        mov     century, %al
        call    put2
        mov     $0x09, %al              /* year */
        call    field
        mov     $'-', %al
        call    putc
        mov     $0x08, %al              /* month */
        call    field
        mov     $'-', %al
        call    putc
        mov     $0x07, %al              /* day of month */
        call    field
        mov     $' ', %al
        call    putc

        mov     $0x04, %al              /* hours */
        call    cmos
        mov     %al, %bl                /* bl: raw hour (bit 7 = PM in 12h mode) */
        and     $0x7f, %al
        call    tobin
        testb   $0x02, regb             /* 24-hour mode? */
        jnz     3f
        cmp     $12, %al
        jne     4f
        xor     %al, %al                /* 12 AM/PM -> 0 (+12 below for PM) */
4:      test    $0x80, %bl
        jz      3f
        add     $12, %al
3:      call    put2
        mov     $':', %al
        call    putc
        mov     $0x02, %al              /* minutes */
        call    field
        mov     $':', %al
        call    putc
        mov     $0x00, %al              /* seconds */
        call    field
        mov     $crlf, %si
        call    puts
halt:
        cli
        hlt
        jmp     halt

/* cmos: al = CMOS register al */
cmos:
        out     %al, $0x70
        in      $0x71, %al
        ret

/* tobin: al BCD -> binary unless register B says binary. Clobbers ah. */
tobin:
        testb   $0x04, regb
        jnz     1f
        mov     %al, %ah
        shr     $4, %ah
        and     $0x0f, %al
        aad                             /* al = ah * 10 + al, ah = 0 */
1:      ret

/* field: read CMOS register al, convert, print two digits */
field:
        call    cmos
        call    tobin
        /* fall through */
/* put2: print al (0..99) as two decimal digits */
put2:
        push    %ax
        aam                             /* ah = al / 10, al = al % 10 */
        add     $0x3030, %ax
        xchg    %al, %ah
        call    putc
        xchg    %al, %ah
        call    putc
        pop     %ax
        ret

        .include "uart16.inc"

msg:    .asciz  "RTC "
crlf:   .asciz  "\r\n"
regb:   .byte   0
century: .byte  0
