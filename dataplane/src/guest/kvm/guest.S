# The KVM test guest: a program that writes memory only in a form it can check later.
#
# 32-bit protected mode, flat segments, paging off, no interrupts: the host sets the vCPU
# up that way and starts it at CODE. Assembled by dataplane/build.rs with GNU as; every
# upper-case constant comes from layout.rs (--defsym), so host and guest share one layout.
#
# A written page: word 0 its page number, word 1 its generation (never 0), word 2 the sum
# of words 4..1023, word 3 their running-sum sum (each word weighted by 1024 - index), then
# the body. The table at TABLE holds each page's current generation; 0 means the page must
# be all zeros. A sweep can then tell an intact page from a stale one (older generation),
# a foreign one (other page number) and a torn one (sums disagree).
#
# Pacing is the host's: the program asks through PORT_CMD how many operations to do. Only
# integer instructions the KVM instruction emulator handles are used, since nested hosts
# run this program under emulation.

.code32
.text
.globl _start
_start:
    cld
    mov $STACK_TOP, %esp

main_loop:
    call tick
    mov $PORT_CMD, %dx
    in %dx, %eax
    call tick
    test %eax, %eax
    jz main_loop
    cmp $CMD_SWEEP, %eax
    je do_sweep
    mov %eax, %ecx
do_ops:
    push %ecx
    call one_op
    addl $1, ST_PROGRESS
    adcl $0, ST_PROGRESS+4
    movl $NO_PFN, ST_CUR_PFN
    call tick
    pop %ecx
    loop do_ops
    jmp main_loop

do_sweep:
    call sweep
    mov %eax, ST_SWEEP_BAD
    incl ST_SWEEPS
    mov $PORT_REPORT, %dx
    out %eax, %dx
    jmp main_loop

# The clock: records the TSC; on the first tick after the host moved the program
# (ST_ARRIVED = 0) it keeps the gap since the last tick before the move.
tick:
    push %eax
    push %edx
    push %ecx
    push %ebx
    rdtsc
    cmpl $0, ST_ARRIVED
    jne 1f
    mov %eax, %ecx
    mov %edx, %ebx
    sub ST_LAST_TSC, %ecx
    sbb ST_LAST_TSC+4, %ebx
    mov %ecx, ST_ARRIVAL_GAP
    mov %ebx, ST_ARRIVAL_GAP+4
    movl $1, ST_ARRIVED
    incl ST_ARRIVALS
1:  mov %eax, ST_LAST_TSC
    mov %edx, ST_LAST_TSC+4
    pop %ebx
    pop %ecx
    pop %edx
    pop %eax
    ret

# eax = next xorshift32 value. Clobbers edx.
rand:
    mov ST_RNG, %eax
    mov %eax, %edx
    shl $13, %edx
    xor %edx, %eax
    mov %eax, %edx
    shr $17, %edx
    xor %edx, %eax
    mov %eax, %edx
    shl $5, %edx
    xor %edx, %eax
    mov %eax, ST_RNG
    ret

# eax = rand() % ecx (ecx > 0). Clobbers edx.
randmod:
    call rand
    xor %edx, %edx
    div %ecx
    mov %edx, %eax
    ret

# eax = ST_GEN = the next generation, skipping 0.
next_gen:
    mov ST_GEN, %eax
    inc %eax
    jnz 1f
    inc %eax
1:  mov %eax, ST_GEN
    ret

# One write: picks a page (hot set or anywhere) and a kind (full, partial, zero).
one_op:
    mov $100, %ecx
    call randmod
    cmp P_HOT_PCT, %eax
    jae 1f
    mov P_HOT_PAGES, %ecx
    jmp 2f
1:  mov P_DATA_END, %ecx
    sub P_DATA_FIRST, %ecx
2:  call randmod
    add P_DATA_FIRST, %eax
    mov %eax, %ebx
    mov %ebx, ST_CUR_PFN
    mov $100, %ecx
    call randmod
    cmp P_PCT_FULL, %eax
    jb op_full
    sub P_PCT_FULL, %eax
    cmp P_PCT_PARTIAL, %eax
    jb op_partial
    jmp op_zero

# Rewrites page ebx whole: a new generation, an arithmetic sequence from a random start.
op_full:
    call next_gen
    mov %ebx, %edi
    shl $12, %edi
    mov %ebx, (%edi)
    mov %eax, 4(%edi)
    call rand
    push %eax
    call rand
    or $1, %eax
    mov %eax, %esi
    pop %eax
    add $HDR_BYTES, %edi
    mov $BODY_WORDS, %ecx
    push %ebx
    xor %ebx, %ebx
    xor %ebp, %ebp
1:  stosl
    add %eax, %ebx
    add %ebx, %ebp
    add %esi, %eax
    loop 1b
    mov %ebx, (8-PAGE)(%edi)
    mov %ebp, (12-PAGE)(%edi)
    pop %ebx
    mov ST_GEN, %eax
    mov %eax, TABLE(,%ebx,4)
    ret

# Adds a random odd value to P_PARTIAL_WORDS consecutive body words of page ebx and
# updates its sums (not recomputed: the rest of the page is not read) and generation.
op_partial:
    mov TABLE(,%ebx,4), %eax
    test %eax, %eax
    jz op_full
    mov P_PARTIAL_WORDS, %ecx
    push %ecx
    mov $BODY_WORDS+1, %eax
    sub %ecx, %eax
    mov %eax, %ecx
    call randmod
    add $HDR_WORDS, %eax
    mov %ebx, %edi
    shl $12, %edi
    lea (%edi,%eax,4), %edi
    mov $PAGE_WORDS, %esi
    sub %eax, %esi
    call rand
    or $1, %eax
    mov %eax, %edx
    pop %ecx
    push %ebx
    xor %ebx, %ebx
    xor %ebp, %ebp
1:  add %edx, (%edi)
    add %edx, %ebx
    mov %edx, %eax
    imul %esi, %eax
    add %eax, %ebp
    add $4, %edi
    dec %esi
    loop 1b
    pop %eax
    mov %eax, %edi
    shl $12, %edi
    add %ebx, 8(%edi)
    add %ebp, 12(%edi)
    mov %eax, %ebx
    call next_gen
    mov %eax, 4(%edi)
    mov %eax, TABLE(,%ebx,4)
    ret

# Zeroes page ebx and records it as a zero page.
op_zero:
    mov %ebx, %edi
    shl $12, %edi
    xor %eax, %eax
    mov $PAGE_WORDS, %ecx
    rep stosl
    movl $0, TABLE(,%ebx,4)
    ret

# Checks every data page against the table; eax = bad pages, each also sent to
# PORT_BAD_PAGE.
sweep:
    xor %ebp, %ebp
    mov P_DATA_FIRST, %ebx
s_loop:
    cmp P_DATA_END, %ebx
    jae s_done
    mov %ebx, %esi
    shl $12, %esi
    mov TABLE(,%ebx,4), %eax
    test %eax, %eax
    jnz s_written
    mov %esi, %edi
    mov $PAGE_WORDS, %ecx
    repe scasl
    jne s_bad
    jmp s_next
s_written:
    cmp (%esi), %ebx
    jne s_bad
    cmp 4(%esi), %eax
    jne s_bad
    add $HDR_BYTES, %esi
    mov $BODY_WORDS, %ecx
    xor %edx, %edx
    xor %edi, %edi
1:  lodsl
    add %eax, %edx
    add %edx, %edi
    loop 1b
    cmp (8-PAGE)(%esi), %edx
    jne s_bad
    cmp (12-PAGE)(%esi), %edi
    jne s_bad
    jmp s_next
s_bad:
    inc %ebp
    mov %ebx, %eax
    mov $PORT_BAD_PAGE, %dx
    out %eax, %dx
s_next:
    inc %ebx
    jmp s_loop
s_done:
    mov %ebp, %eax
    ret
