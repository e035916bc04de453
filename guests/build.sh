#!/bin/sh
# Build the test guests into guests/build/ (or $1). Reproducible: same sources and
# binutils give byte-identical outputs (no timestamps, no build id, no paths).
#   raw real-mode images: NAME.bin   (loaded at 0x7c00)
#   ELF images:           NAME.elf   (hello32.elf: ELFCLASS32, hello64/mmio64.elf: ELFCLASS64)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-"$here/build"}
AS=${AS:-as}
LD=${LD:-ld}
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$here"
ASFLAGS="-I $here -mx86-used-note=no --noexecstack"
LDFLAGS="--build-id=none -nostdlib -static -z noexecstack -z norelro -z noseparate-code -z max-page-size=4096 --no-warn-rwx-segments"

raw() {   # raw NAME: 16-bit code linked at 0x7c00, flat binary
    $AS --32 $ASFLAGS -o "$tmp/$1.o" "$1.S"
    $LD -m elf_i386 $LDFLAGS -Ttext=0x7c00 -e _start --oformat=binary -o "$tmp/$1.bin" "$tmp/$1.o"
    cp "$tmp/$1.bin" "$out/$1.bin"
}
elf() {   # elf NAME 32|64: linked at 1 MiB
    if [ "$2" = 32 ]; then a=--32; m=elf_i386; else a=--64; m=elf_x86_64; fi
    $AS $a $ASFLAGS -o "$tmp/$1.o" "$1.S"
    $LD -m $m $LDFLAGS -Ttext=0x100000 -e _start -o "$tmp/$1.elf" "$tmp/$1.o"
    cp "$tmp/$1.elf" "$out/$1.elf"
}

raw hello
raw echo
raw rtc
raw ioloop
raw coalesce
raw kbd
raw reset
raw ticker
raw scratch
raw mouse
raw console
elf hello32 32
elf hello64 64
elf mmio64 64
