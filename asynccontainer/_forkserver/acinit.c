/*
 * The init of a container run by the C executor: PID 1 of its pid
 * namespace, as init.py is for the Python executor (which see for the two
 * ways it follows the container). A program of its own, exec'd by the
 * executor's StartInit step, so that PID 1 does not run on the fork
 * server's memory. Linked without libc (-nostdlib -static): it runs in a
 * container whose root holds no libc of the host's.
 *
 * Usage: ac-init TARGET (the PID to follow, or 0 for every process).
 */

#include "cexec_sys.h"

#define EXIT_SETUP_FAILED 3

/* With a signalfd, not handlers: every container's init shares the fork
 * server's memory, so no global may say whom to relay to. */
static void init_loop(int target)
{
    uint64_t relayed = 0;
    static const int signals[] = {15, 2, 1, 10, 12, 3}; /* TERM INT HUP USR1 USR2 QUIT */
    for (unsigned i = 0; i < sizeof signals / sizeof *signals; i++)
        relayed |= 1ull << (signals[i] - 1);
    uint64_t mask = relayed | 1ull << (SIGCHLD_ - 1);
    S4(SYS_rt_sigprocmask, SIG_BLOCK_, &mask, 0, 8);
    long sfd = S4(SYS_signalfd4, -1, &mask, 8, O_CLOEXEC_);
    if (sfd < 0)
        S1(SYS_exit_group, EXIT_SETUP_FAILED);
    int last = 0;
    for (;;) {
        /* Reap first: a child that exited before the signalfd existed sent
         * a SIGCHLD nobody blocked, which the kernel discarded. */
        int done = 0;
        for (;;) {
            int status = 0;
            long pid = S4(SYS_wait4, -1, &status, WNOHANG_, 0);
            if (pid == 0)
                break;
            if (pid < 0) {
                done = 1; /* no child left */
                break;
            }
            if (!target || pid == target) {
                last = status;
                if (pid == target) {
                    done = 1;
                    break;
                }
            }
        }
        if (done)
            break;
        uint32_t info[32]; /* struct signalfd_siginfo: 128 bytes, ssi_signo first */
        long got = S3(SYS_read, sfd, info, sizeof info);
        if (got == -EINTR_ || got == (long)sizeof info) {
            if (got > 0 && info[0] != SIGCHLD_)
                S2(SYS_kill, target ? target : -1, info[0]);
            continue;
        }
        break;
    }
    int code;
    if ((last & 0x7f) && (last & 0x7f) != 0x7f)
        code = 128 + (last & 0x7f); /* PID 1 cannot die of a signal it sends itself */
    else
        code = (last >> 8) & 0xff;
    S1(SYS_exit_group, code);
}


/* The compiler may turn struct copies into these calls. */
void *memset(void *to, int c, unsigned long n)
{
    volatile unsigned char *t = to;
    while (n--)
        *t++ = (unsigned char)c;
    return to;
}

void *memcpy(void *to, const void *from, unsigned long n)
{
    volatile unsigned char *t = to;
    const unsigned char *f = from;
    while (n--)
        *t++ = *f++;
    return to;
}

int ac_init_main(long argc, char **argv)
{
    /* Named as the Python executor's init is not: "_acinit" is its file's. */
    S2(SYS_prctl, PR_SET_NAME_, "ac-init");
    long target = 0;
    if (argc > 1)
        for (const char *c = argv[1]; *c >= '0' && *c <= '9'; c++)
            target = target * 10 + (*c - '0');
    init_loop((int)target);
    return 0;
}

#if defined(__x86_64__)
__asm__(".text\n"
        ".globl _start\n"
        "_start:\n"
        "  xor %ebp, %ebp\n"
        "  mov (%rsp), %rdi\n"
        "  lea 8(%rsp), %rsi\n"
        "  and $-16, %rsp\n"
        "  call ac_init_main\n"
        "  mov %eax, %edi\n"
        "  mov $231, %eax\n"
        "  syscall\n"
        "  hlt\n");
#elif defined(__aarch64__)
__asm__(".text\n"
        ".globl _start\n"
        "_start:\n"
        "  mov x29, #0\n"
        "  ldr x0, [sp]\n"
        "  add x1, sp, #8\n"
        "  bl ac_init_main\n"
        "  mov x8, #94\n"
        "  svc 0\n");
#endif
