/*
 * The init of a container run by the C executor: PID 1 of its pid
 * namespace, as init.py is for the Python executor (which see for the two
 * ways it follows the container). A program of its own, exec'd by the
 * executor's StartInit step, so that PID 1 does not run on the fork
 * server's memory. Linked without libc (-nostdlib -static): it runs in a
 * container whose root holds no libc of the host's.
 *
 * Usage: ac-init TARGET [STATUS_FD] follows TARGET (the PID of the command);
 * ac-stay TARGET [STATUS_FD] stays while any process is left (a service's).
 * STATUS_FD is a pipe to the caller. Following, the init writes there the
 * signal TARGET died of, as one byte, so that the caller reports -N rather
 * than 128+N; staying, it writes TARGET's wait status (4 bytes) as soon as
 * TARGET is reaped, so that the caller learns at once that a service's
 * main process ended.
 */

#include "cexec_sys.h"

#define EXIT_SETUP_FAILED 3

/* With a signalfd, not handlers: every container's init shares the fork
 * server's memory, so no global may say whom to relay to. */
static void init_loop(int target, int status_fd, int stay)
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
    /* SIGPIPE blocked: a caller gone makes a write fail, not kill PID 1. */
    uint64_t pipe_mask = 1ull << (13 - 1);
    S4(SYS_rt_sigprocmask, SIG_BLOCK_, &pipe_mask, 0, 8);
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
            if (pid == target) {
                last = status;
                if (stay) {
                    if (status_fd >= 0)
                        S3(SYS_write, status_fd, &status, sizeof status);
                    continue;
                }
                done = 1;
                break;
            }
        }
        if (done)
            break;
        uint32_t info[32]; /* struct signalfd_siginfo: 128 bytes, ssi_signo first */
        long got = S3(SYS_read, sfd, info, sizeof info);
        if (got == -EINTR_ || got == (long)sizeof info) {
            if (got > 0 && info[0] != SIGCHLD_)
                S2(SYS_kill, stay ? -1 : target, info[0]);
            continue;
        }
        break;
    }
    int code;
    if ((last & 0x7f) && (last & 0x7f) != 0x7f) {
        /* PID 1 cannot die of a signal it sends itself: 128+N, and N on
         * the status pipe, whose reader then reports -N. */
        unsigned char sig = (unsigned char)(last & 0x7f);
        if (status_fd >= 0 && !stay)
            S3(SYS_write, status_fd, &sig, 1);
        code = 128 + sig;
    } else {
        code = (last >> 8) & 0xff;
    }
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

static long number(const char *c)
{
    long n = 0;
    for (; *c >= '0' && *c <= '9'; c++)
        n = n * 10 + (*c - '0');
    return n;
}

/* The namespaces an excursion joins, user first (setns(2) applies them in a
 * safe order; the list only says which differ from this process's). */
static const struct {
    const char *name;
    long flag;
} namespaces[] = {
    {"user", 0x10000000}, {"cgroup", 0x02000000}, {"ipc", 0x08000000}, {"uts", 0x04000000},
    {"net", 0x40000000},  {"pid", 0x20000000},    {"mnt", 0x00020000},
};

static int same_namespace(const char *pid, const char *name)
{
    char theirs[64], mine[64], *p = theirs;
    const char *parts[] = {"/proc/", pid, "/ns/", name};
    for (unsigned i = 0; i < 4; i++)
        for (const char *c = parts[i]; *c; c++)
            *p++ = *c;
    *p = 0;
    p = mine;
    const char *own[] = {"/proc/self/ns/", name};
    for (unsigned i = 0; i < 2; i++)
        for (const char *c = own[i]; *c; c++)
            *p++ = *c;
    *p = 0;
    struct stat_ a, b;
    if (S4(SYS_newfstatat, AT_FDCWD_, theirs, &a, 0) < 0 || S4(SYS_newfstatat, AT_FDCWD_, mine, &b, 0) < 0)
        return 0;
    /* st_dev then st_ino lead struct stat on x86_64 and aarch64 alike. */
    const uint64_t *x = (const uint64_t *)a.bytes, *y = (const uint64_t *)b.bytes;
    return x[0] == y[0] && x[1] == y[1];
}

/* ac-enter PID HANDSHAKE PIDFD COMMAND...: an excursion (Guix's
 * container-excursion) into the namespaces of PID, as the Python
 * executor's excursion.py does, for a command: join with one
 * setns(pidfd, flags), chdir to "/", fork (a new pid namespace applies to
 * children only), report "execing" and exec there; exit as the command. */
static int enter(long argc, char **argv, char **envp)
{
    /* Not dumpable: in the target's user namespace its processes hold
     * CAP_SYS_PTRACE there; a non-dumpable process may only be traced with
     * the capability in its memory's namespace, the host's (ptrace(2)). */
    S2(SYS_prctl, 4 /* PR_SET_DUMPABLE */, 0);
    S2(SYS_prctl, PR_SET_NAME_, "ac-excursion");
    if (argc < 5)
        return EXIT_SETUP_FAILED;
    int handshake = (int)number(argv[2]), pidfd = (int)number(argv[3]);
    long flags = 0;
    for (unsigned i = 0; i < sizeof namespaces / sizeof *namespaces; i++)
        if (!same_namespace(argv[1], namespaces[i].name))
            flags |= namespaces[i].flag;
    long r = flags ? S2(SYS_setns, pidfd, flags) : 0;
    if (r >= 0)
        r = S1(SYS_chdir, "/");
    if (r < 0) {
        ac_report_failure(handshake, 0, r, 0);
        return EXIT_SETUP_FAILED;
    }
    S1(SYS_close, pidfd);
    long child = S5(SYS_clone, SIGCHLD_, 0, 0, 0, 0);
    if (child < 0) {
        ac_report_failure(handshake, 0, child, 0);
        return EXIT_SETUP_FAILED;
    }
    if (child == 0) {
        S2(SYS_prctl, PR_SET_PDEATHSIG_, SIGKILL_);
        S3(SYS_fcntl, handshake, 2 /* F_SETFD */, 1 /* FD_CLOEXEC */);
        uint32_t nenv = 0;
        while (envp[nenv])
            nenv++;
        ac_report_exec(handshake, -1);
        long error = exec_path((const char *const *)argv + 4, (const char *const *)envp, nenv);
        ac_report_failure(handshake, 1, error, 0);
        S1(SYS_exit_group, 127);
    }
    S1(SYS_close, handshake);
    int status = 0;
    long got;
    do
        got = S4(SYS_wait4, child, &status, 0, 0);
    while (got == -EINTR_);
    if (got < 0)
        return EXIT_SETUP_FAILED;
    int sig = status & 0x7f;
    if (sig && sig != 0x7f) {
        /* Die of the same signal, so the caller sees -N (os.waitstatus_to_exitcode). */
        struct sigaction_ action = {0, 0, 0, 0};
        S4(SYS_rt_sigaction, sig, &action, 0, 8);
        uint64_t mask = 0;
        S4(SYS_rt_sigprocmask, SIG_SETMASK_, &mask, 0, 8);
        S2(SYS_kill, S0(SYS_getpid), sig);
        return 128 + sig;
    }
    return (status >> 8) & 0xff;
}

int ac_init_main(long argc, char **argv)
{
    char **envp = argv + argc + 1;
    if (argc > 0 && ac_same(argv[0], "ac-enter"))
        return enter(argc, argv, envp);
    /* Named as the Python executor's init is: "_acinit" is its file's. */
    S2(SYS_prctl, PR_SET_NAME_, "ac-init");
    int stay = argc > 0 && ac_same(argv[0], "ac-stay");
    init_loop(argc > 1 ? (int)number(argv[1]) : 0, argc > 2 ? (int)number(argv[2]) : -1, stay);
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
