/*
 * The C executor of a container's plan (see _plan/encode.py for the format).
 *
 * ac_spawn() runs in the fork server. It clones a child with CLONE_VM and a
 * stack of its own (clone3(2), CLONE_INTO_CGROUP when given a cgroup), so
 * nothing of the server's memory is copied: the child shares it. That is
 * sound only because the child never runs Python and never calls into libc:
 * every call below is a raw system call on the child's own stack, errno is
 * never written (libc's errno lives in the server thread's TLS, which the
 * child shares), and no lock, heap or global is touched. The child:
 *
 *   1. resets every signal disposition and unblocks signals (ac_spawn
 *      blocked them all around the clone, so no handler of the server's
 *      can run in the child, on the server's memory);
 *   2. dies with the server (PR_SET_PDEATHSIG), closes every fd but its
 *      go socket and its lifetime pipe;
 *   3. waits for the go (the server has written its id maps, its cgroups
 *      and its veth) with the handshake socket;
 *   4. receives the plan and its fds from the caller on the handshake, into
 *      the lower part of its own mapping;
 *   5. executes the steps in order; the first that fails is reported to the
 *      caller as (step index, errno, detail) and the child exits; the last
 *      step execs, and the handshake (close-on-exec) tells the caller.
 *
 * The lifetime pipe's write end is close-on-exec too: the server frees the
 * child's mapping when it reads end-of-file there (the exec, or the exit).
 * An init forked off execs a program of its own (acinit.c), so nothing
 * stays on the mapping after that.
 */

#include "cexec_sys.h"

/* ---- the plan, as encoded by _plan/encode.py -------------------------- */

#define MAX_INTS 64
#define MAX_STRS 512
#define MAX_SLOTS 256
#define MAX_RECEIVED 256
#define MAX_ARGS 4096

struct step {
    uint32_t op;
    uint32_t nints, nstrs;
    const int64_t *ints;
    const char *strs[MAX_STRS];
    uint32_t lens[MAX_STRS];
};

struct state {
    int handshake;
    int init; /* the init program, opened O_PATH by the server, or -1 */
    int root;
    int received[MAX_RECEIVED];
    int nreceived;
    int slots[MAX_SLOTS];
    uint64_t kept;
    int has_kept;
    int64_t detail; /* reported with a failure: a mask of missing capabilities */
};

enum op {
    OP_UNSHARE = 1,
    OP_INSTALL_STDIO,
    OP_SET_HOSTNAME,
    OP_MAKE_MOUNTS_PRIVATE,
    OP_OPEN_PATH,
    OP_CLONE_TREE,
    OP_NEW_ROOT,
    OP_MOUNT_FILE_SYSTEM,
    OP_BIND,
    OP_SET_PROPAGATION,
    OP_MAKE_LINK,
    OP_READ_ONLY_PATH,
    OP_MASK_PATH,
    OP_PIVOT_ROOT,
    OP_WRITE_FILE,
    OP_MAKE_DIRECTORY,
    OP_REMOVE_PATH,
    OP_CHMOD,
    OP_REMOUNT_READ_ONLY,
    OP_BRING_LOOPBACK_UP,
    OP_LOCK_MOUNTS,
    OP_CHDIR,
    OP_INSTALL_PASSED_FDS,
    OP_START_INIT,
    OP_LIMIT_BOUNDING_SET,
    OP_START_SESSION,
    OP_SET_RESOURCE_LIMITS,
    OP_SET_IDS,
    OP_SET_UMASK,
    OP_SET_NO_NEW_PRIVS,
    OP_KEEP_CAPABILITIES,
    OP_LOAD_SECCOMP,
    OP_EXEC,
    OP_ENTER,
};

/* Every step returns 0 or a negative errno. */

static long open_beneath(int root, const char *path, long flags)
{
    struct open_how_ how = {(uint64_t)(flags | O_CLOEXEC_), 0, RESOLVE_IN_ROOT_ | RESOLVE_NO_MAGICLINKS_};
    return S4(SYS_openat2, root, path, &how, sizeof how);
}

static long is_directory(int fd)
{
    struct stat_ st;
    long r = S4(SYS_newfstatat, fd, "", &st, AT_EMPTY_PATH_);
    if (r < 0)
        return r;
    return (st_mode_of(&st) & S_IFMT_) == S_IFDIR_;
}

/* Split `path` at its last slash into `parent` (a buffer) and return the name. */
static const char *split(const char *path, char *parent, size_t size)
{
    size_t n = ac_length(path), cut = n;
    while (cut > 0 && path[cut - 1] != '/')
        cut--;
    size_t keep = cut;
    while (keep > 1 && path[keep - 1] == '/')
        keep--;
    if (keep == 0) {
        parent[0] = '.';
        parent[1] = 0;
    } else {
        if (keep >= size)
            keep = size - 1;
        ac_copy(parent, path, keep);
        parent[keep] = 0;
    }
    return path + cut;
}

static long make_beneath(int root, const char *path, int directory, int depth)
{
    long fd = open_beneath(root, path, O_PATH_);
    if (fd != -ENOENT_ || depth > 64)
        return fd;
    char parent_path[4096];
    const char *name = split(path, parent_path, sizeof parent_path);
    if (!*name)
        return -EINVAL_;
    long parent = make_beneath(root, parent_path, 1, depth + 1);
    if (parent < 0)
        return parent;
    long r = directory ? S3(SYS_mkdirat, parent, name, 0755)
                       : S4(SYS_mknodat, parent, name, 0644 | S_IFREG_, 0);
    if (r < 0 && r != -EEXIST_) {
        S1(SYS_close, parent);
        return r;
    }
    struct open_how_ how = {O_PATH_ | O_CLOEXEC_, 0, RESOLVE_NO_SYMLINKS_ | RESOLVE_BENEATH_};
    fd = S4(SYS_openat2, parent, name, &how, sizeof how);
    S1(SYS_close, parent);
    return fd;
}

static long attach(struct state *st, int mount, const char *target)
{
    long directory = is_directory(mount);
    if (directory < 0)
        return directory;
    long where = make_beneath(st->root, target, (int)directory, 0);
    if (where < 0)
        return where;
    long kind = is_directory((int)where);
    long r;
    if (kind < 0)
        r = kind;
    else if (kind != directory)
        r = directory ? -ENOTDIR_ : -EISDIR_;
    else
        r = S5(SYS_move_mount, mount, "", where, "", MOVE_MOUNT_F_EMPTY_PATH_ | MOVE_MOUNT_T_EMPTY_PATH_);
    S1(SYS_close, where);
    return r;
}

/* A new file system's detached mount: options as (key, value or flag) pairs. */
static long new_file_system(const char *fstype, const char *source, const char *const *options,
                            const int64_t *is_flag, uint32_t noptions, long attributes)
{
    long context = S2(SYS_fsopen, fstype, FSOPEN_CLOEXEC_);
    if (context < 0)
        return context;
    long r = 0;
    if (source && *source)
        r = S5(SYS_fsconfig, context, FSCONFIG_SET_STRING_, "source", source, 0);
    for (uint32_t i = 0; r >= 0 && i < noptions; i++) {
        if (is_flag[i])
            r = S5(SYS_fsconfig, context, FSCONFIG_SET_FLAG_, options[2 * i], 0, 0);
        else
            r = S5(SYS_fsconfig, context, FSCONFIG_SET_STRING_, options[2 * i], options[2 * i + 1], 0);
    }
    if (r >= 0)
        r = S5(SYS_fsconfig, context, FSCONFIG_CMD_CREATE_, 0, 0, 0);
    if (r >= 0)
        r = S3(SYS_fsmount, context, FSMOUNT_CLOEXEC_, attributes);
    S1(SYS_close, context);
    return r;
}

static long set_attr(int fd, int recursive, uint64_t set, uint64_t clr, uint64_t propagation)
{
    struct mount_attr_ attr = {set, clr, propagation, 0};
    return S5(SYS_mount_setattr, fd, "", AT_EMPTY_PATH_ | (recursive ? AT_RECURSIVE_ : 0), &attr, sizeof attr);
}

#define READ_ONLY (MOUNT_ATTR_RDONLY_ | MOUNT_ATTR_NOSUID_ | MOUNT_ATTR_NODEV_ | MOUNT_ATTR_NOEXEC_)

static long cover(struct state *st, const char *target, int mask, int null_fd)
{
    long where = open_beneath(st->root, target, O_PATH_);
    if (where == -ENOENT_)
        return 0;
    if (where < 0)
        return where;
    long over;
    if (!mask) {
        over = S3(SYS_open_tree, where, "", OPEN_TREE_CLONE_ | AT_RECURSIVE_ | AT_EMPTY_PATH_ | O_CLOEXEC_);
        if (over >= 0) {
            long r = set_attr((int)over, 1, READ_ONLY, 0, 0);
            if (r < 0) {
                S1(SYS_close, over);
                over = r;
            }
        }
    } else {
        long directory = is_directory((int)where);
        if (directory < 0)
            over = directory;
        else if (directory) {
            static const char *const tmpfs_options[] = {"mode", "0555", "size", "4k"};
            static const int64_t values[] = {0, 0};
            over = new_file_system("tmpfs", "none", tmpfs_options, values, 2, READ_ONLY);
        } else
            over = S3(SYS_open_tree, null_fd, "", OPEN_TREE_CLONE_ | AT_EMPTY_PATH_ | O_CLOEXEC_);
    }
    long r = over;
    if (over >= 0) {
        r = S5(SYS_move_mount, over, "", where, "", MOVE_MOUNT_F_EMPTY_PATH_ | MOVE_MOUNT_T_EMPTY_PATH_);
        S1(SYS_close, over);
    }
    S1(SYS_close, where);
    return r;
}

static long write_all(int fd, const char *data, size_t n)
{
    while (n) {
        long w = S3(SYS_write, fd, data, n);
        if (w == -EINTR_)
            continue;
        if (w < 0)
            return w;
        data += w;
        n -= (size_t)w;
    }
    return 0;
}

static long write_at(int dir, const char *path, const char *data)
{
    long fd = S4(SYS_openat, dir, path, O_WRONLY_ | O_CLOEXEC_, 0);
    if (fd < 0)
        return fd;
    long r = write_all((int)fd, data, ac_length(data));
    S1(SYS_close, fd);
    return r;
}

static char *decimal(char *p, uint64_t v)
{
    char digits[24];
    int n = 0;
    do
        digits[n++] = (char)('0' + v % 10);
    while (v /= 10);
    while (n)
        *p++ = digits[--n];
    return p;
}

/* Map `id` to itself, one id: all a process may map in its own namespace. */
static long write_identity_map(int proc, const char *path, uint64_t id)
{
    char map[64];
    char *p = decimal(map, id);
    *p++ = ' ';
    p = decimal(p, id);
    *p++ = ' ', *p++ = '1', *p++ = '\n', *p = 0;
    return write_at(proc, path, map);
}

static long mkdirs(const char *path, long mode)
{
    /* os.makedirs(path, exist_ok=True), in the container after pivot_root. */
    char buffer[4096];
    size_t n = ac_length(path);
    if (n >= sizeof buffer)
        return -EINVAL_;
    ac_copy(buffer, path, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (buffer[i] == '/' || buffer[i] == 0) {
            char saved = buffer[i];
            buffer[i] = 0;
            long r = S3(SYS_mkdirat, AT_FDCWD_, buffer, mode);
            if (r < 0 && r != -EEXIST_)
                return r;
            buffer[i] = saved;
        }
    }
    return 0;
}

static long drop_bounding_set(uint64_t kept)
{
    for (long number = 0; number < 64; number++) {
        long held = S2(SYS_prctl, PR_CAPBSET_READ_, number);
        if (held < 0)
            return 0; /* past the last capability the kernel knows */
        if (held && !(kept >> number & 1)) {
            long r = S2(SYS_prctl, PR_CAPBSET_DROP_, number);
            if (r < 0)
                return r;
        }
    }
    return 0;
}

static long capset3(uint64_t kept)
{
    struct cap_header_ header = {0x20080522, 0};
    struct cap_data_ data[2] = {
        {(uint32_t)kept, (uint32_t)kept, (uint32_t)kept},
        {(uint32_t)(kept >> 32), (uint32_t)(kept >> 32), (uint32_t)(kept >> 32)},
    };
    return S2(SYS_capset, &header, data);
}

static long exec_step(struct state *st, const struct step *s);
static long enter_step(struct state *st, const struct step *s);

/* Put `fd` in a slot if its checks passed (`r` is 0), else close it; return `r`. */
static long keep(struct state *st, int64_t slot, long fd, long r)
{
    if (r < 0)
        S1(SYS_close, fd);
    else
        st->slots[slot] = (int)fd;
    return r < 0 ? r : 0;
}


static long run_step(struct state *st, const struct step *s)
{
    const int64_t *n = s->ints;
    long r = 0;
    switch (s->op) {
    case OP_UNSHARE:
        return S1(SYS_unshare, n[0]);
    case OP_INSTALL_STDIO:
        if (st->nreceived < 3)
            return -EINVAL_;
        for (int i = 0; i < 3; i++) {
            r = S3(SYS_dup3, st->received[i], i, 0);
            if (r < 0)
                return r;
        }
        for (int i = 0; i < 3; i++)
            if (st->received[i] > 2)
                S1(SYS_close, st->received[i]);
        for (int i = 3; i < st->nreceived; i++)
            st->received[i - 3] = st->received[i];
        st->nreceived -= 3;
        return 0;
    case OP_SET_HOSTNAME:
        return S2(SYS_sethostname, s->strs[0], s->lens[0]);
    case OP_MAKE_MOUNTS_PRIVATE:
        return S5(SYS_mount, 0, "/", 0, MS_REC_ | MS_PRIVATE_, 0);
    case OP_OPEN_PATH: { /* slot, magic (-1: none); source */
        long fd = S3(SYS_openat, AT_FDCWD_, s->strs[0], O_PATH_ | O_CLOEXEC_);
        if (fd < 0)
            return fd;
        if (n[1] >= 0) {
            uint64_t statfs[15];
            r = S2(SYS_fstatfs, fd, statfs);
            if (r >= 0 && (int64_t)statfs[0] != n[1])
                r = -EINVAL_;
        }
        return keep(st, n[0], fd, r);
    }
    case OP_CLONE_TREE: { /* slot, optional, nofollow; source */
        long flags = OPEN_TREE_CLONE_ | AT_RECURSIVE_ | O_CLOEXEC_ | (n[2] ? AT_SYMLINK_NOFOLLOW_ : 0);
        long tree = S3(SYS_open_tree, AT_FDCWD_, s->strs[0], flags);
        if (tree == -ENOENT_ && n[1])
            return 0;
        if (tree < 0)
            return tree;
        if (n[2]) {
            struct stat_ stt;
            r = S4(SYS_newfstatat, tree, "", &stt, AT_EMPTY_PATH_);
            if (r >= 0 && (st_mode_of(&stt) & S_IFMT_) == S_IFLNK_)
                r = -ELOOP_;
        }
        return keep(st, n[0], tree, r);
    }
    case OP_NEW_ROOT: { /* slot (-1: tmpfs); staging, tmpfs_mode */
        long root;
        if (n[0] < 0) {
            const char *options[] = {"mode", s->strs[1]};
            static const int64_t values[] = {0};
            root = new_file_system("tmpfs", "none", options, values, 1, 0);
        } else {
            root = st->slots[n[0]];
            st->slots[n[0]] = -1;
        }
        if (root < 0)
            return root;
        long staging = S3(SYS_openat, AT_FDCWD_, s->strs[0], O_PATH_ | O_DIRECTORY_ | O_NOFOLLOW_ | O_CLOEXEC_);
        if (staging < 0) {
            S1(SYS_close, root);
            return staging;
        }
        r = S5(SYS_move_mount, root, "", staging, "", MOVE_MOUNT_F_EMPTY_PATH_ | MOVE_MOUNT_T_EMPTY_PATH_);
        S1(SYS_close, staging);
        if (r < 0) {
            S1(SYS_close, root);
            return r;
        }
        st->root = (int)root;
        return 0;
    }
    case OP_MOUNT_FILE_SYSTEM: { /* attributes, noptions, ntolerate, flags[noptions], tolerate[]; target, fstype, source, k, v ... */
        long attributes = n[0];
        uint32_t noptions = (uint32_t)n[1], ntolerate = (uint32_t)n[2];
        long mount = new_file_system(s->strs[1], s->strs[2], s->strs + 3, n + 3, noptions, attributes);
        if (mount < 0) {
            for (uint32_t i = 0; i < ntolerate; i++)
                if (-mount == n[3 + noptions + i])
                    return 0;
            return mount;
        }
        r = attach(st, (int)mount, s->strs[0]);
        S1(SYS_close, mount);
        return r;
    }
    case OP_BIND: { /* slot, attr_set, attr_clr; target */
        int tree = st->slots[n[0]];
        if (tree < 0)
            return 0; /* an optional source this host lacks */
        st->slots[n[0]] = -1;
        if (n[1] || n[2])
            r = set_attr(tree, 1, (uint64_t)n[1], (uint64_t)n[2], 0);
        if (r >= 0)
            r = attach(st, tree, s->strs[0]);
        S1(SYS_close, tree);
        return r;
    }
    case OP_SET_PROPAGATION: { /* propagation; target */
        long where = open_beneath(st->root, s->strs[0], O_PATH_);
        if (where < 0)
            return where;
        r = set_attr((int)where, 0, 0, 0, (uint64_t)n[0]);
        S1(SYS_close, where);
        return r;
    }
    case OP_MAKE_LINK: { /* link, target */
        char parent_path[4096];
        const char *name = split(s->strs[0], parent_path, sizeof parent_path);
        long parent = make_beneath(st->root, parent_path, 1, 0);
        if (parent < 0)
            return parent;
        r = S3(SYS_symlinkat, s->strs[1], parent, name);
        if (r == -EEXIST_) {
            char existing[4096];
            long got = S4(SYS_readlinkat, parent, name, existing, sizeof existing - 1);
            if (got >= 0) {
                existing[got] = 0;
                if (ac_same(existing, s->strs[1]))
                    r = 0;
            }
        }
        S1(SYS_close, parent);
        return r;
    }
    case OP_READ_ONLY_PATH:
        return cover(st, s->strs[0], 0, -1);
    case OP_MASK_PATH: /* null_slot; target */
        return cover(st, s->strs[0], 1, st->slots[n[0]]);
    case OP_PIVOT_ROOT:
        r = S1(SYS_fchdir, st->root);
        if (r >= 0)
            r = S2(SYS_pivot_root, ".", ".");
        if (r >= 0)
            r = S2(SYS_umount2, ".", MNT_DETACH_);
        if (r >= 0)
            r = S1(SYS_chdir, "/");
        if (r >= 0) {
            S1(SYS_close, st->root);
            st->root = -1;
        }
        return r;
    case OP_WRITE_FILE: { /* mode; target, content */
        char parent_path[4096];
        split(s->strs[0], parent_path, sizeof parent_path);
        r = mkdirs(parent_path, 0755);
        if (r < 0)
            return r;
        long fd = S4(SYS_openat, AT_FDCWD_, s->strs[0], O_WRONLY_ | O_CREAT_ | O_EXCL_ | O_NOFOLLOW_ | O_CLOEXEC_, n[0]);
        if (fd == -EEXIST_)
            return 0;
        if (fd < 0)
            return fd;
        r = write_all((int)fd, s->strs[1], s->lens[1]);
        S1(SYS_close, fd);
        return r;
    }
    case OP_MAKE_DIRECTORY:
        return mkdirs(s->strs[0], n[0]);
    case OP_REMOVE_PATH:
        r = S3(SYS_unlinkat, AT_FDCWD_, s->strs[0], 0);
        return r == -ENOENT_ ? 0 : r;
    case OP_CHMOD:
        return S3(SYS_fchmodat, AT_FDCWD_, s->strs[0], n[0]);
    case OP_REMOUNT_READ_ONLY: {
        long fd = S3(SYS_openat, AT_FDCWD_, s->strs[0], O_PATH_ | O_CLOEXEC_);
        if (fd < 0)
            return fd;
        r = set_attr((int)fd, 0, MOUNT_ATTR_RDONLY_, 0, 0);
        S1(SYS_close, fd);
        return r;
    }
    case OP_BRING_LOOPBACK_UP: {
        long sock = S3(SYS_socket, AF_INET_, SOCK_DGRAM_ | SOCK_CLOEXEC_, 0);
        if (sock < 0)
            return sock;
        struct ifreq_ request = {{'l', 'o', 0}, 0, {0}};
        r = S3(SYS_ioctl, sock, SIOCGIFFLAGS_, &request);
        if (r >= 0) {
            request.flags |= 1; /* IFF_UP */
            r = S3(SYS_ioctl, sock, SIOCSIFFLAGS_, &request);
        }
        S1(SYS_close, sock);
        return r;
    }
    case OP_LOCK_MOUNTS: { /* proc_slot */
        int proc = st->slots[n[0]];
        st->slots[n[0]] = -1;
        long uid = S0(SYS_getuid), gid = S0(SYS_getgid);
        r = S1(SYS_unshare, CLONE_NEWUSER_ | CLONE_NEWNS_);
        if (r >= 0)
            r = write_at(proc, "self/setgroups", "deny");
        if (r >= 0)
            r = write_identity_map(proc, "self/uid_map", (uint64_t)uid);
        if (r >= 0)
            r = write_identity_map(proc, "self/gid_map", (uint64_t)gid);
        S1(SYS_close, proc);
        return r;
    }
    case OP_CHDIR:
        return S1(SYS_chdir, s->strs[0]);
    case OP_INSTALL_PASSED_FDS: /* numbers... */
        if ((uint32_t)st->nreceived != s->nints)
            return -EINVAL_;
        for (int i = 0; i < st->nreceived; i++) {
            r = S3(SYS_dup3, st->received[i], n[i], 0);
            if (r < 0)
                return r;
        }
        for (int i = 0; i < st->nreceived; i++)
            S1(SYS_close, st->received[i]);
        st->nreceived = 0;
        return 0;
    case OP_START_INIT: { /* follow_child, new_session, status_fd (-1: none) */
        if (st->init < 0)
            return -ENOEXEC_;
        if (n[1]) {
            r = S0(SYS_setsid);
            if (r < 0)
                return r;
        }
        /* A plain fork: the child gets a copy of the memory and goes on
         * with the steps. This process stays PID 1 for the container's
         * life, so it may not stay on the server's memory (a target holding
         * its capabilities could write it through /proc/1/mem, the class of
         * CVE-2016-9962): it execs the init program (acinit.c), opened on
         * the host before the root changed, which replaces its memory. */
        long child = S5(SYS_clone, SIGCHLD_, 0, 0, 0, 0);
        if (child < 0)
            return child;
        if (child > 0) {
            char number[24], *end = decimal(number, (uint64_t)child);
            *end = 0;
            /* The status pipe stays open across the exec: ac-init writes
             * how the target ended there (see acinit.c). */
            char status[24];
            end = decimal(status, n[2] >= 0 ? (uint64_t)n[2] : 0);
            *end = 0;
            const char *argv[] = {n[0] ? "ac-init" : "ac-stay", number, n[2] >= 0 ? status : 0, 0};
            const char *envp[] = {0};
            S1(SYS_close, st->handshake);
            S5(SYS_execveat, st->init, "", argv, envp, AT_EMPTY_PATH_);
            S1(SYS_exit_group, EXIT_SETUP_FAILED); /* its namespace dies with it */
        }
        if (n[2] >= 0)
            S1(SYS_close, n[2]); /* never the target's: only the init reports */
        return 0;
    }
    case OP_LIMIT_BOUNDING_SET: { /* keep mask, required, keep_across_setuid */
        struct cap_header_ header = {0x20080522, 0};
        struct cap_data_ data[2];
        r = S2(SYS_capget, &header, data);
        if (r < 0)
            return r;
        uint64_t permitted = data[0].permitted | (uint64_t)data[1].permitted << 32;
        uint64_t effective = data[0].effective | (uint64_t)data[1].effective << 32;
        uint64_t wanted = (uint64_t)n[0];
        uint64_t missing = wanted & ~permitted;
        if (missing && n[1]) {
            st->detail = (int64_t)missing;
            return -EPERM_;
        }
        st->kept = wanted & permitted;
        st->has_kept = 1;
        if (effective >> 8 & 1) { /* CAP_SETPCAP */
            r = drop_bounding_set(st->kept);
            if (r < 0)
                return r;
        }
        if (n[2])
            return S2(SYS_prctl, PR_SET_KEEPCAPS_, 1);
        return 0;
    }
    case OP_START_SESSION: {
        r = S0(SYS_setsid);
        if (r < 0)
            return r;
        uint32_t termios[15];
        if (S3(SYS_ioctl, 0, 0x5401 /* TCGETS */, termios) >= 0) {
            r = S3(SYS_ioctl, 0, TIOCSCTTY_, 0);
            if (r == -EPERM_)
                r = 0; /* another session's terminal (tty_ioctl(4)): never stolen */
        }
        return r < 0 ? r : 0;
    }
    case OP_SET_RESOURCE_LIMITS: /* (resource, soft, hard) ... */
        for (uint32_t i = 0; i + 2 < s->nints; i += 3) {
            struct rlimit_ limit = {(uint64_t)n[i + 1], (uint64_t)n[i + 2]};
            r = S4(SYS_prlimit64, 0, n[i], &limit, 0);
            if (r < 0)
                return r;
        }
        return 0;
    case OP_SET_IDS: { /* uid (-1), gid (-1), has_groups, groups... */
        if (n[2]) {
            uint32_t groups[MAX_INTS];
            uint32_t count = s->nints - 3;
            if (count > MAX_INTS)
                return -EINVAL_;
            for (uint32_t i = 0; i < count; i++)
                groups[i] = (uint32_t)n[3 + i];
            r = S2(SYS_setgroups, count, groups);
            if (r < 0)
                return r;
        }
        if (n[1] >= 0 && (r = S1(SYS_setgid, n[1])) < 0)
            return r;
        if (n[0] >= 0 && (r = S1(SYS_setuid, n[0])) < 0)
            return r;
        return 0;
    }
    case OP_SET_UMASK:
        S1(SYS_umask, n[0]);
        return 0;
    case OP_SET_NO_NEW_PRIVS:
        return S5(SYS_prctl, PR_SET_NO_NEW_PRIVS_, 1, 0, 0, 0);
    case OP_KEEP_CAPABILITIES:
        if (!st->has_kept)
            return -EINVAL_;
        r = capset3(st->kept);
        if (r >= 0)
            r = S5(SYS_prctl, PR_CAP_AMBIENT_, PR_CAP_AMBIENT_CLEAR_ALL_, 0, 0, 0);
        for (long number = 0; r >= 0 && number < 64; number++)
            if (st->kept >> number & 1)
                r = S5(SYS_prctl, PR_CAP_AMBIENT_, PR_CAP_AMBIENT_RAISE_, number, 0, 0);
        if (r >= 0)
            r = S5(SYS_prctl, PR_SET_KEEPCAPS_, 0, 0, 0, 0);
        return r;
    case OP_LOAD_SECCOMP: {
        struct sock_fprog_ program = {(unsigned short)(s->lens[0] / 8), (void *)s->strs[0]};
        return S3(SYS_prctl, PR_SET_SECCOMP_, SECCOMP_MODE_FILTER_, &program);
    }
    case OP_EXEC:
        return exec_step(st, s);
    case OP_ENTER:
        return enter_step(st, s);
    }
    return -EINVAL_;
}

/* ---- exec, as os.execvpe does it -------------------------------------- */

static long exec_step(struct state *st, const struct step *s)
{
    /* ints: send_root, argc, listen_pid; strs: argv..., env... */
    long send_root = s->ints[0];
    uint32_t argc = (uint32_t)s->ints[1];
    long listen_pid = s->nints > 2 ? s->ints[2] : 0;
    const char *argv[MAX_ARGS + 1], *envp[MAX_ARGS + 2];
    uint32_t nenv = s->nstrs - argc;
    if (argc == 0 || argc > MAX_ARGS || nenv > MAX_ARGS)
        return -E2BIG_;
    for (uint32_t i = 0; i < argc; i++)
        argv[i] = s->strs[i];
    argv[argc] = 0;
    for (uint32_t i = 0; i < nenv; i++)
        envp[i] = s->strs[argc + i];
    /* sd_listen_fds(3) takes the sockets only if LISTEN_PID names the
     * process reading them: this one, in its pid namespace. */
    char listen[32] = "LISTEN_PID=";
    if (listen_pid) {
        *decimal(listen + 11, (uint64_t)S0(SYS_getpid)) = 0;
        envp[nenv++] = listen;
    }
    envp[nenv] = 0;
    /* What the steps left open (host fds among them) goes first. */
    for (int i = 0; i < MAX_SLOTS; i++)
        if (st->slots[i] >= 0) {
            S1(SYS_close, st->slots[i]);
            st->slots[i] = -1;
        }
    /* "execing": the caller waits for the handshake's end-of-file next. */
    long root = -1;
    if (send_root) {
        root = S3(SYS_openat, AT_FDCWD_, "/", O_PATH_ | O_DIRECTORY_ | O_CLOEXEC_);
        if (root < 0)
            return root;
    }
    ac_report_exec(st->handshake, (int)root);
    if (root >= 0)
        S1(SYS_close, root);
    return exec_path(argv, envp, nenv);
}

/* ---- an excursion: the rest is done by the enter program -------------- */

/* ints: the target's PID, argc; strs: argv..., env...; received: stdin,
 * stdout, stderr and the target's pidfd. The joining happens in a program of its own
 * (acinit.c, as "ac-enter"): once in the target's user namespace, a process
 * there with CAP_SYS_PTRACE could trace this one, whose memory is the fork
 * server's. Exec'd, its memory is its own, and it makes itself
 * non-dumpable before it joins (CVE-2016-9962). */
static long enter_step(struct state *st, const struct step *s)
{
    uint32_t argc = (uint32_t)s->ints[1];
    uint32_t nenv = s->nstrs - argc;
    if (st->nreceived != 4 || argc == 0 || argc > MAX_ARGS - 8 || nenv > MAX_ARGS)
        return -E2BIG_;
    for (int i = 0; i < 3; i++) {
        long r = S3(SYS_dup3, st->received[i], i, 0);
        if (r < 0)
            return r;
    }
    char pid[24], handshake[24], pidfd[24];
    *decimal(pid, (uint64_t)s->ints[0]) = 0;
    *decimal(handshake, (uint64_t)st->handshake) = 0;
    *decimal(pidfd, (uint64_t)st->received[3]) = 0;
    const char *argv[MAX_ARGS + 1], *envp[MAX_ARGS + 1];
    argv[0] = "ac-enter";
    argv[1] = pid;
    argv[2] = handshake;
    argv[3] = pidfd;
    for (uint32_t i = 0; i < argc; i++)
        argv[4 + i] = s->strs[i];
    argv[4 + argc] = 0;
    for (uint32_t i = 0; i < nenv; i++)
        envp[i] = s->strs[argc + i];
    envp[nenv] = 0;
    if (st->init < 0)
        return -ENOEXEC_;
    /* Kept across the exec: the enter program reports on the handshake. */
    long r = S3(SYS_fcntl, st->handshake, 2 /* F_SETFD */, 0);
    if (r >= 0)
        r = S3(SYS_fcntl, st->received[3], 2 /* F_SETFD */, 0);
    if (r >= 0)
        r = S5(SYS_execveat, st->init, "", argv, envp, AT_EMPTY_PATH_);
    return r;
}

/* ---- the child -------------------------------------------------------- */

struct child_args {
    int go;
    int lifetime;
    int init;
    char *plan;      /* the lower part of the mapping, for the plan */
    size_t plan_room;
};

static long read_full(int fd, char *into, size_t n)
{
    while (n) {
        long got = S3(SYS_read, fd, into, n);
        if (got == -EINTR_)
            continue;
        if (got <= 0)
            return got < 0 ? got : -EINVAL_;
        into += got;
        n -= (size_t)got;
    }
    return 0;
}

static void fail(struct state *st, int32_t index, long error, int code)
{
    ac_report_failure(st->handshake, index, error, st->detail);
    S1(SYS_exit_group, code);
}

static long lift(int fd, long floor)
{
    long moved = S3(SYS_fcntl, fd, F_DUPFD_CLOEXEC_, floor);
    if (moved >= 0)
        S1(SYS_close, fd);
    return moved;
}

static int child_main(struct child_args *args)
{
    /* 1. Signals: every disposition back to its default, then unblocked. */
    for (long sig = 1; sig <= 64; sig++) {
        if (sig == SIGKILL_ || sig == SIGSTOP_)
            continue;
        struct sigaction_ action = {0, 0, 0, 0};
        S4(SYS_rt_sigaction, sig, &action, 0, 8);
    }
    uint64_t none = 0;
    S4(SYS_rt_sigprocmask, SIG_SETMASK_, &none, 0, 8);
    /* 2. Die with the server; keep only the go socket and the lifetime pipe. */
    S2(SYS_prctl, PR_SET_PDEATHSIG_, SIGKILL_);
    /* The fds kept, in order: every other one above 2 is closed. */
    int keep[3] = {args->go, args->lifetime, args->init};
    for (int i = 0; i < 3; i++)
        for (int j = i + 1; j < 3; j++)
            if (keep[j] < keep[i]) {
                int t = keep[i];
                keep[i] = keep[j];
                keep[j] = t;
            }
    long low = 3;
    for (int i = 0; i < 3; i++) {
        if (keep[i] < low)
            continue;
        if (keep[i] > low)
            S3(SYS_close_range, low, keep[i] - 1, 0);
        low = keep[i] + 1;
    }
    S3(SYS_close_range, low, ~0U, 0);
    S2(SYS_prctl, PR_SET_NAME_, "ac-container");

    /* 3. The go, with the handshake socket. */
    char byte = 0;
    struct iovec_ iov = {&byte, 1};
    union {
        struct cmsghdr_ header;
        char space[sizeof(struct cmsghdr_) + 8];
    } control;
    struct msghdr_ message = {0, 0, &iov, 1, &control, sizeof control, 0};
    long got = S3(SYS_recvmsg, args->go, &message, MSG_CMSG_CLOEXEC_);
    S1(SYS_close, args->go);
    if (got != 1 || byte != 'g' || message.controllen < sizeof(struct cmsghdr_) + sizeof(int)
        || control.header.type != SCM_RIGHTS_)
        S1(SYS_exit_group, EXIT_PARENT_DIED);
    struct state st;
    int handshake;
    ac_copy(&handshake, control.space + sizeof(struct cmsghdr_), sizeof handshake);
    st.handshake = handshake;
    st.init = args->init;
    st.root = -1;
    st.nreceived = 0;
    st.kept = 0;
    st.has_kept = 0;
    st.detail = 0;
    for (int i = 0; i < MAX_SLOTS; i++)
        st.slots[i] = -1;

    /* 4. The plan: a header (magic, size, fd_floor, steps), its fds with it. */
    uint32_t header[4];
    union {
        struct cmsghdr_ header;
        char space[sizeof(struct cmsghdr_) + MAX_RECEIVED * sizeof(int)];
    } fds;
    struct iovec_ hiov = {header, sizeof header};
    struct msghdr_ hmessage = {0, 0, &hiov, 1, &fds, sizeof fds, 0};
    got = S3(SYS_recvmsg, st.handshake, &hmessage, MSG_CMSG_CLOEXEC_);
    if (got <= 0)
        S1(SYS_exit_group, EXIT_PARENT_DIED);
    if (got < (long)sizeof header && read_full(st.handshake, (char *)header + got, sizeof header - (size_t)got) < 0)
        S1(SYS_exit_group, EXIT_PARENT_DIED);
    if (header[0] != 0x31504341 /* "ACP1" */ || header[1] > args->plan_room)
        S1(SYS_exit_group, EXIT_PARENT_DIED);
    if (hmessage.controllen >= sizeof(struct cmsghdr_) && fds.header.type == SCM_RIGHTS_) {
        int count = (int)((fds.header.len - sizeof(struct cmsghdr_)) / sizeof(int));
        ac_copy(st.received, fds.space + sizeof(struct cmsghdr_), (size_t)count * sizeof(int));
        st.nreceived = count;
    }
    if (read_full(st.handshake, args->plan, header[1]) < 0)
        S1(SYS_exit_group, EXIT_PARENT_DIED);
    long floor = header[2];
    long lifted = lift(st.handshake, floor);
    if (lifted < 0)
        fail(&st, -1, lifted, EXIT_SETUP_FAILED);
    st.handshake = (int)lifted;
    for (int i = 0; i < st.nreceived; i++) {
        lifted = lift(st.received[i], floor);
        if (lifted < 0)
            fail(&st, -1, lifted, EXIT_SETUP_FAILED);
        st.received[i] = (int)lifted;
    }

    /* 5. The steps. */
    const char *p = args->plan, *end = args->plan + header[1];
    struct step s;
    for (int32_t index = 0; index < (int32_t)header[3]; index++) {
        if (p + 8 > end)
            fail(&st, index, -EINVAL_, EXIT_SETUP_FAILED);
        const uint32_t *h = (const uint32_t *)p;
        s.op = h[0];
        s.nints = h[1] & 0xffff;
        s.nstrs = h[1] >> 16;
        p += 8;
        if (s.nstrs > MAX_STRS || p + 8 * s.nints > end)
            fail(&st, index, -EINVAL_, EXIT_SETUP_FAILED);
        s.ints = (const int64_t *)p;
        p += 8 * s.nints;
        for (uint32_t i = 0; i < s.nstrs; i++) {
            if (p + 8 > end)
                fail(&st, index, -EINVAL_, EXIT_SETUP_FAILED);
            uint32_t len = *(const uint32_t *)p;
            s.lens[i] = len;
            s.strs[i] = p + 8;
            p += 8 + ((len + 1 + 7) & ~7u);
            if (p > end)
                fail(&st, index, -EINVAL_, EXIT_SETUP_FAILED);
        }
        long r = run_step(&st, &s);
        if (r < 0)
            fail(&st, index, r, s.op == OP_EXEC ? EXIT_EXEC_FAILED : EXIT_SETUP_FAILED);
    }
    S1(SYS_exit_group, EXIT_SETUP_FAILED); /* a plan that does not end in an exec */
    return 0;
}

/* ---- clone3 with a stack, the way musl's __clone starts a child -------- */

struct clone_args_ {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls, set_tid,
        set_tid_size, cgroup;
};

#if defined(__x86_64__)
/* rdi: clone_args, rsi: size, rdx: fn, rcx: arg. The child starts on its
 * new stack with the registers of the parent: fn and arg are kept in r12
 * and r13 (callee-saved, so saved here first). */
__asm__(".text\n"
        ".globl ac_clone3\n"
        ".type ac_clone3,@function\n"
        "ac_clone3:\n"
        "  push %r12\n"
        "  push %r13\n"
        "  mov %rdx, %r12\n"
        "  mov %rcx, %r13\n"
        "  mov $435, %eax\n"
        "  syscall\n"
        "  test %rax, %rax\n"
        "  jnz 1f\n"
        "  xor %ebp, %ebp\n"
        "  and $-16, %rsp\n"
        "  mov %r13, %rdi\n"
        "  call *%r12\n"
        "  mov %eax, %edi\n"
        "  mov $231, %eax\n"
        "  syscall\n"
        "  hlt\n"
        "1:\n"
        "  pop %r13\n"
        "  pop %r12\n"
        "  ret\n"
        );
#elif defined(__aarch64__)
__asm__(".text\n"
        ".globl ac_clone3\n"
        "ac_clone3:\n"
        "  stp x19, x20, [sp, #-16]!\n"
        "  mov x19, x2\n"
        "  mov x20, x3\n"
        "  mov x8, #435\n"
        "  svc 0\n"
        "  cbnz x0, 1f\n"
        "  mov x29, #0\n"
        "  mov x0, x20\n"
        "  blr x19\n"
        "  mov x8, #94\n"
        "  svc 0\n"
        "1:\n"
        "  ldp x19, x20, [sp], #16\n"
        "  ret\n"
        );
#endif

extern long ac_clone3(struct clone_args_ *args, size_t size, int (*fn)(struct child_args *), struct child_args *arg);

/* ---- what the fork server calls (through ctypes) ----------------------- */

#define PAGE 4096u
#define PLAN_ROOM (1u << 20)
#define STACK_ROOM (1u << 20)
/* A child's mapping: a guard page, the plan's room, a guard page, the
 * stack, a guard page. A stack that overflows faults on a guard instead
 * of writing over the plan, or over the fork server's memory. */
#define MAPPING_SIZE (PAGE + PLAN_ROOM + PAGE + STACK_ROOM + PAGE)
#define PROT_NONE_ 0
#define PROT_RW_ 3
#define MAP_PRIVATE_ANONYMOUS_NORESERVE_STACK_ (0x02 | 0x20 | 0x4000 | 0x20000)

/* Map a child's memory (only touched pages cost); return its address, or -errno. */
long ac_map(void)
{
    long base = sc6(SYS_mmap, 0, MAPPING_SIZE, PROT_RW_, MAP_PRIVATE_ANONYMOUS_NORESERVE_STACK_, -1, 0);
    if (base < 0 && base > -4096)
        return base;
    char *p = (char *)base;
    long r = S3(SYS_mprotect, p, PAGE, PROT_NONE_);
    if (r >= 0)
        r = S3(SYS_mprotect, p + PAGE + PLAN_ROOM, PAGE, PROT_NONE_);
    if (r >= 0)
        r = S3(SYS_mprotect, p + MAPPING_SIZE - PAGE, PAGE, PROT_NONE_);
    if (r < 0) {
        S2(SYS_munmap, p, MAPPING_SIZE);
        return r;
    }
    return base;
}

/* Free a mapping of ac_map (its child exec'd, or every process on it exited). */
void ac_unmap(long base)
{
    S2(SYS_munmap, base, MAPPING_SIZE);
}

/*
 * Clone a container child onto the mapping at `base` (of ac_map; the caller
 * frees it with ac_unmap once `lifetime`'s read end sees end-of-file).
 * `flags`: CLONE_NEW* (and no exit signal: SIGCHLD is set here); `init`:
 * the init program (acinit.c) opened O_PATH | O_CLOEXEC, or -1;
 * `cgroup`: a cgroup v2 directory's fd, or -1. Returns the PID, or -errno.
 */
long ac_spawn(uint64_t flags, int cgroup, int go, int lifetime, int init, long base)
{
    char *mapping = (char *)base;
    char *stack = mapping + PAGE + PLAN_ROOM + PAGE;
    struct child_args *args = (struct child_args *)(stack + STACK_ROOM - 64);
    args->go = go;
    args->lifetime = lifetime;
    args->init = init;
    args->plan = mapping + PAGE;
    args->plan_room = PLAN_ROOM;
    struct clone_args_ clone_args = {0};
    clone_args.flags = flags | CLONE_VM | (cgroup >= 0 ? CLONE_INTO_CGROUP : 0);
    clone_args.exit_signal = SIGCHLD_;
    clone_args.stack = (uint64_t)(uintptr_t)stack;
    clone_args.stack_size = STACK_ROOM - 128;
    clone_args.cgroup = cgroup >= 0 ? (uint64_t)cgroup : 0;
    /* No handler of the server's may run in the child before it resets
     * them: every signal is blocked around the clone (posix_spawn does the
     * same), and the server's mask is restored after. */
    uint64_t all = ~0ull, old = 0;
    S4(SYS_rt_sigprocmask, SIG_SETMASK_, &all, &old, 8);
    long pid = ac_clone3(&clone_args, sizeof clone_args, child_main, args);
    S4(SYS_rt_sigprocmask, SIG_SETMASK_, &old, 0, 8);
    return pid;
}
