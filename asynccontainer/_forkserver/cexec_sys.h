/*
 * Raw system calls, and the kernel constants and structures they take,
 * for cexecutor.c (whose child shares the fork server's memory and may not
 * call into libc) and acinit.c (linked without libc).
 */

#ifndef AC_CEXEC_SYS_H
#define AC_CEXEC_SYS_H

#define _GNU_SOURCE
#include <stddef.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <linux/sched.h>
#include <linux/types.h>

/* ---- raw system calls ------------------------------------------------- */

#if defined(__x86_64__)
static inline long sc6(long n, long a, long b, long c, long d, long e, long f)
{
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    long ret;
    __asm__ __volatile__("syscall"
                         : "=a"(ret)
                         : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                         : "rcx", "r11", "memory");
    return ret;
}
#elif defined(__aarch64__)
static inline long sc6(long n, long a, long b, long c, long d, long e, long f)
{
    register long x8 __asm__("x8") = n;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    register long x3 __asm__("x3") = d;
    register long x4 __asm__("x4") = e;
    register long x5 __asm__("x5") = f;
    __asm__ __volatile__("svc 0"
                         : "+r"(x0)
                         : "r"(x8), "r"(x1), "r"(x2), "r"(x3), "r"(x4), "r"(x5)
                         : "memory");
    return x0;
}
#else
#error "the C executor supports x86_64 and aarch64; the Python executor runs elsewhere"
#endif

#define S0(n) sc6((n), 0, 0, 0, 0, 0, 0)
#define S1(n, a) sc6((n), (long)(a), 0, 0, 0, 0, 0)
#define S2(n, a, b) sc6((n), (long)(a), (long)(b), 0, 0, 0, 0)
#define S3(n, a, b, c) sc6((n), (long)(a), (long)(b), (long)(c), 0, 0, 0)
#define S4(n, a, b, c, d) sc6((n), (long)(a), (long)(b), (long)(c), (long)(d), 0, 0)
#define S5(n, a, b, c, d, e) sc6((n), (long)(a), (long)(b), (long)(c), (long)(d), (long)(e), 0)

/* Constants from the kernel's uapi headers, spelt out: the child includes
 * no libc header that could pull in a function it must not call. */
#define AT_FDCWD_ -100
#define O_RDONLY_ 0
#define O_WRONLY_ 01
#define O_CREAT_ 0100
#define O_EXCL_ 0200
#define O_NOFOLLOW_ 0400000
#define O_DIRECTORY_ 0200000
#define O_CLOEXEC_ 02000000
#define O_PATH_ 010000000
#define F_DUPFD_CLOEXEC_ 1030
#define AT_EMPTY_PATH_ 0x1000
#define AT_RECURSIVE_ 0x8000
#define AT_SYMLINK_NOFOLLOW_ 0x100
#define OPEN_TREE_CLONE_ 1
#define MOVE_MOUNT_F_EMPTY_PATH_ 0x04
#define MOVE_MOUNT_T_EMPTY_PATH_ 0x40
#define FSOPEN_CLOEXEC_ 1
#define FSMOUNT_CLOEXEC_ 1
#define FSCONFIG_SET_FLAG_ 0
#define FSCONFIG_SET_STRING_ 1
#define FSCONFIG_CMD_CREATE_ 6
#define MOUNT_ATTR_RDONLY_ 0x1
#define MOUNT_ATTR_NOSUID_ 0x2
#define MOUNT_ATTR_NODEV_ 0x4
#define MOUNT_ATTR_NOEXEC_ 0x8
#define MS_REC_ 16384
#define MS_PRIVATE_ (1 << 18)
#define MNT_DETACH_ 2
#define RESOLVE_NO_MAGICLINKS_ 0x02
#define RESOLVE_NO_SYMLINKS_ 0x04
#define RESOLVE_BENEATH_ 0x08
#define RESOLVE_IN_ROOT_ 0x10
#define S_IFMT_ 0170000
#define S_IFDIR_ 0040000
#define S_IFREG_ 0100000
#define S_IFLNK_ 0120000
#define PR_SET_PDEATHSIG_ 1
#define PR_SET_NAME_ 15
#define PR_SET_KEEPCAPS_ 8
#define PR_CAPBSET_READ_ 23
#define PR_CAPBSET_DROP_ 24
#define PR_SET_NO_NEW_PRIVS_ 38
#define PR_CAP_AMBIENT_ 47
#define PR_CAP_AMBIENT_RAISE_ 2
#define PR_CAP_AMBIENT_CLEAR_ALL_ 4
#define PR_SET_SECCOMP_ 22
#define SECCOMP_MODE_FILTER_ 2
#define SIGKILL_ 9
#define SIGSTOP_ 19
#define SIGCHLD_ 17
#define SIG_BLOCK_ 0
#define SIG_SETMASK_ 2
#define SCM_RIGHTS_ 1
#define SOL_SOCKET_ 1
#define MSG_CMSG_CLOEXEC_ 0x40000000
#define TIOCSCTTY_ 0x540E
#define SIOCGIFFLAGS_ 0x8913
#define SIOCSIFFLAGS_ 0x8914
#define AF_INET_ 2
#define SOCK_DGRAM_ 2
#define SOCK_CLOEXEC_ 02000000
#define WNOHANG_ 1
#define CLONE_NEWUSER_ 0x10000000
#define CLONE_NEWNS_ 0x00020000
#define ENOENT_ 2
#define EINTR_ 4
#define ENOEXEC_ 8
#define EACCES_ 13
#define EEXIST_ 17
#define ENOTDIR_ 20
#define EISDIR_ 21
#define EINVAL_ 22
#define ELOOP_ 40
#define EPERM_ 1
#define E2BIG_ 7
#define EMSGSIZE_ 90

/* Exit statuses, as the Python executor's (target.py). */
#define EXIT_PARENT_DIED 2
#define EXIT_SETUP_FAILED 3
#define EXIT_EXEC_FAILED 127

struct open_how_ {
    uint64_t flags, mode, resolve;
};
struct mount_attr_ {
    uint64_t attr_set, attr_clr, propagation, userns_fd;
};
struct iovec_ {
    void *base;
    size_t len;
};
struct msghdr_ {
    void *name;
    int namelen;
    struct iovec_ *iov;
    size_t iovlen;
    void *control;
    size_t controllen;
    int flags;
};
struct cmsghdr_ {
    size_t len;
    int level;
    int type;
};
struct sigaction_ {
    void *handler;
    unsigned long flags;
    void *restorer;
    uint64_t mask;
};
struct stat_ { /* only st_mode is read: at offset 24 on x86_64, 16 on aarch64 */
    unsigned char bytes[256];
};
struct sock_fprog_ {
    unsigned short len;
    void *filter;
};
struct rlimit_ {
    uint64_t soft, hard;
};
struct cap_header_ {
    uint32_t version;
    int pid;
};
struct cap_data_ {
    uint32_t effective, permitted, inheritable;
};
struct ifreq_ {
    char name[16];
    short flags;
    char pad[22];
};

static inline unsigned st_mode_of(const struct stat_ *st)
{
#if defined(__x86_64__)
    return *(const unsigned *)(st->bytes + 24);
#else
    return *(const unsigned *)(st->bytes + 16);
#endif
}


/* ---- helpers shared by the executor and the init/enter program --------- */

static inline size_t ac_length(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

static inline void ac_copy(void *to, const void *from, size_t n)
{
    volatile unsigned char *t = to;
    const unsigned char *f = from;
    while (n--)
        *t++ = *f++;
}

static inline int ac_same(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

/* execve `argv` as os.execvpe does: a name without a slash is looked up
 * on the PATH of `envp` (or os.defpath); returns the error to report: the
 * first that is not ENOENT or ENOTDIR, else the last. */
static long exec_path(const char *const *argv, const char *const *envp, uint32_t nenv)
{
    const char *file = argv[0];
    for (const char *c = file; *c; c++)
        if (*c == '/')
            return S3(SYS_execve, file, argv, envp);
    const char *path = "/bin:/usr/bin"; /* os.defpath */
    for (uint32_t i = 0; i < nenv; i++)
        if (envp[i][0] == 'P' && envp[i][1] == 'A' && envp[i][2] == 'T' && envp[i][3] == 'H' && envp[i][4] == '=')
            path = envp[i] + 5;
    long saved = 0, last = -ENOENT_;
    char candidate[4096];
    size_t flen = ac_length(file);
    const char *p = path;
    for (;;) {
        const char *end = p;
        while (*end && *end != ':')
            end++;
        size_t dlen = (size_t)(end - p);
        if (dlen + 1 + flen + 1 <= sizeof candidate) {
            size_t k = 0;
            if (dlen == 0)
                candidate[k++] = '.';
            else {
                ac_copy(candidate, p, dlen);
                k = dlen;
            }
            candidate[k++] = '/';
            ac_copy(candidate + k, file, flen + 1);
            last = S3(SYS_execve, candidate, argv, envp);
            if (last != -ENOENT_ && last != -ENOTDIR_ && !saved)
                saved = last;
        }
        if (!*end)
            break;
        p = end + 1;
    }
    return saved ? saved : last;
}

/* Report a failing step to the caller: a frame of _wire's (a big-endian
 * length, a count of fds) holding "ACF1", the index, the errno, a detail. */
static inline void ac_report_failure(int handshake, int32_t index, long error, int64_t detail)
{
    unsigned char record[5 + 20] = {0, 0, 0, 20, 0, 'A', 'C', 'F', '1'};
    int32_t error32 = (int32_t)-error;
    ac_copy(record + 9, &index, 4);
    ac_copy(record + 13, &error32, 4);
    ac_copy(record + 17, &detail, 8);
    struct iovec_ iov = {record, sizeof record};
    struct msghdr_ message = {0, 0, &iov, 1, 0, 0, 0};
    S3(SYS_sendmsg, handshake, &message, 0x4000 /* MSG_NOSIGNAL */);
}

/* Report "execing" ("ACX1"), with the root's fd if `root` is one. */
static inline void ac_report_exec(int handshake, int root)
{
    char record[9] = {0, 0, 0, 4, (char)(root >= 0 ? 1 : 0), 'A', 'C', 'X', '1'};
    struct iovec_ iov = {record, sizeof record};
    union {
        struct cmsghdr_ header;
        char space[sizeof(struct cmsghdr_) + 8];
    } control;
    struct msghdr_ message = {0, 0, &iov, 1, 0, 0, 0};
    if (root >= 0) {
        control.header.len = sizeof(struct cmsghdr_) + sizeof(int);
        control.header.level = SOL_SOCKET_;
        control.header.type = SCM_RIGHTS_;
        ac_copy(control.space + sizeof(struct cmsghdr_), &root, sizeof root);
        message.control = &control;
        message.controllen = sizeof(struct cmsghdr_) + 8;
    }
    S3(SYS_sendmsg, handshake, &message, 0x4000 /* MSG_NOSIGNAL */);
}

#endif
