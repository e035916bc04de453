/*
 * remote_hw.bridge._fastvfu: the bridge's per-access socket calls, in C.
 *
 * Why this exists: every BAR access of a guest behind the bridge is one vfio-user
 * REGION_READ or REGION_WRITE from QEMU, answered after one register access on the
 * link.  The bridge runs right after a context switch each time (QEMU woke it), and
 * on this class of machine the Python that reads, decodes, encodes and sends around
 * the link access costs two to three times its warm figure then (cold caches, see
 * docs/performance.md).  So the two socket calls around the link access are folded
 * into one C call each:
 *
 *   recv_access(fd, fds, ready)  one recvmsg(); a read that is exactly one well-formed
 *                                REGION_READ or REGION_WRITE of 1, 2, 4 or 8 bytes
 *                                comes back as a tuple, one that is several of them
 *                                (QEMU posts writes without waiting) as a list of
 *                                tuples, anything else as the bytes read;
 *   send_reply(fd, ...)          encode that access's reply and send it.
 *
 * Like remote_hw/net/_fastio.c this never judges input: whatever is not the common
 * frame (a partial frame, two frames in one read, another command, a frame with file
 * descriptors, anything before the VERSION handshake) is returned as raw bytes for
 * remote_hw.bridge.vfio_user.ServerConnection, which decodes it or names the error.
 * remote_hw/bridge/fastpath.py holds the pure-Python twin of both calls (used when
 * this is not built) and tests/test_bridge_fastpath.py checks the two agree.
 *
 * Little-endian host assumed (x86-64), as vfio_user.py assumes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>

#include "../net/_sockio.h"  /* send_all */
#include <unistd.h>

/* Header: u16 id, u16 command, u32 size (incl. header), u32 flags, u32 error. */
#define HDR 16
/* REGION_READ/WRITE payload: u64 offset, u32 region, u32 count, then data. */
#define ACCESS 16
#define FIXED (HDR + ACCESS)
#define CMD_READ 9
#define CMD_WRITE 10
#define FLAG_REPLY 0x1
#define FLAG_NO_REPLY 0x10
/* One read.  Bigger messages (a VERSION with a lot of JSON) arrive over several
 * reads and go the Python way, which reassembles them. */
#define RECV_CAP 16384
/* Descriptors accepted with one read (vfio_user.MAX_MSG_FDS). */
#define MAX_FDS 8

static inline uint16_t rd16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t rd32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t rd64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static inline int size_ok(uint32_t count) {
    return count == 1 || count == 2 || count == 4 || count == 8;
}

static int parse_fd(PyObject *arg, int *fd) {
    *fd = (int)PyLong_AsLong(arg);
    return !(*fd == -1 && PyErr_Occurred());
}


/* The access frame at p (n bytes available) as a new tuple; NULL with no error set
 * when it is not one (or not complete), NULL with an error set on a failure.  *size
 * is the frame's size. */
static PyObject *access_at(const unsigned char *p, ssize_t n, uint32_t *size) {
    if (n < FIXED) return NULL;
    uint16_t command = rd16(p + 2);
    uint32_t flags = rd32(p + 8), count = rd32(p + 28);
    *size = rd32(p + 4);
    if ((command != CMD_READ && command != CMD_WRITE) || (flags & ~FLAG_NO_REPLY) != 0 ||
        !size_ok(count) || *size != (command == CMD_READ ? FIXED : FIXED + count) ||
        (ssize_t)*size > n)
        return NULL;
    uint64_t value = 0;
    if (command == CMD_WRITE) memcpy(&value, p + FIXED, count);
    /* Built by hand: Py_BuildValue would parse a format string each time. */
    PyObject *t = PyTuple_New(7);
    if (t == NULL) return NULL;
    PyObject *items[7] = {
        PyLong_FromLong(rd16(p)), PyLong_FromLong(command), PyLong_FromUnsignedLong(flags),
        PyLong_FromUnsignedLongLong(rd64(p + 16)), PyLong_FromUnsignedLong(rd32(p + 24)),
        PyLong_FromUnsignedLong(count), PyLong_FromUnsignedLongLong(value),
    };
    int bad = 0;
    for (int i = 0; i < 7; i++) {
        if (items[i] == NULL) bad = 1;
        PyTuple_SET_ITEM(t, i, items[i]);  /* tuple dealloc skips NULL items */
    }
    if (bad) {
        Py_DECREF(t);
        return NULL;
    }
    return t;
}

/* Append the SCM_RIGHTS descriptors of msg to the list; -1 with an error set (the
 * descriptors not yet appended are closed, so none leaks). */
static int take_fds(struct msghdr *msg, PyObject *fds) {
    int failed = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c != NULL; c = CMSG_NXTHDR(msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        const unsigned char *p = CMSG_DATA(c);
        for (size_t i = 0; i < n; i++) {
            int fd;
            memcpy(&fd, p + i * sizeof(int), sizeof(int));
            if (failed) { close(fd); continue; }
            PyObject *o = PyLong_FromLong(fd);
            if (o == NULL || PyList_Append(fds, o) < 0) {
                Py_XDECREF(o);
                close(fd);
                failed = 1;
                continue;
            }
            Py_DECREF(o);
        }
    }
    return failed ? -1 : 0;
}

PyDoc_STRVAR(recv_access_doc,
"recv_access(fd, fds, ready) -> tuple | list[tuple] | bytes\n\n"
"Read once from QEMU's socket (recvmsg, the GIL released).  Descriptors that came\n"
"with the read are appended to the list fds.  When ready is true, no descriptors\n"
"came and the read is exactly one well-formed REGION_READ or REGION_WRITE command\n"
"of 1, 2, 4 or 8 bytes, return (msg_id, command, flags, offset, region, count,\n"
"value) (value: the written data as a little-endian int, 0 for a read); when it is\n"
"exactly several of them, a list of such tuples; otherwise the bytes read (b\"\"\n"
"when QEMU closed the socket).  Raises OSError on a socket error.");

static PyObject *recv_access(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int fd;
    if (nargs != 3)
        return PyErr_Format(PyExc_TypeError, "recv_access() takes 3 arguments (%zd given)",
                            nargs);
    if (!parse_fd(args[0], &fd)) return NULL;
    PyObject *fds = args[1];
    if (!PyList_Check(fds)) return PyErr_Format(PyExc_TypeError, "fds must be a list");
    int ready = PyObject_IsTrue(args[2]);
    if (ready < 0) return NULL;

    unsigned char buf[RECV_CAP];
    union { char space[CMSG_SPACE(MAX_FDS * sizeof(int))]; struct cmsghdr align; } cbuf;
    struct iovec iov = {buf, sizeof buf};
    struct msghdr msg;
    ssize_t n;
    int err;
    for (;;) {
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.space;
        msg.msg_controllen = sizeof cbuf.space;
        Py_BEGIN_ALLOW_THREADS
        n = recvmsg(fd, &msg, MSG_CMSG_CLOEXEC);
        err = errno;
        Py_END_ALLOW_THREADS
        if (n >= 0 || err != EINTR) break;
        /* A signal: run its Python handler (main thread only), then read again. */
        if (PyErr_CheckSignals() < 0) return NULL;
    }
    if (n < 0) {
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_ssize_t before = PyList_GET_SIZE(fds);
    if (msg.msg_controllen > 0 && take_fds(&msg, fds) < 0) return NULL;
    if (ready && PyList_GET_SIZE(fds) == before) {
        uint32_t size;
        PyObject *first = access_at(buf, n, &size);
        if (first == NULL && PyErr_Occurred()) return NULL;
        if (first != NULL && (ssize_t)size == n) return first;  /* the common case */
        if (first != NULL) {  /* several frames: all accesses, all complete? */
            PyObject *list = PyList_New(1);
            if (list == NULL) {
                Py_DECREF(first);
                return NULL;
            }
            PyList_SET_ITEM(list, 0, first);
            ssize_t pos = size;
            while (pos < n) {
                PyObject *t = access_at(buf + pos, n - pos, &size);
                if (t == NULL) break;
                int r = PyList_Append(list, t);
                Py_DECREF(t);
                if (r < 0) break;
                pos += size;
            }
            if (pos == n) return list;
            Py_DECREF(list);
            if (PyErr_Occurred()) return NULL;
        }
    }
    return PyBytes_FromStringAndSize((const char *)buf, n);
}

PyDoc_STRVAR(send_reply_doc,
"send_reply(fd, msg_id, command, offset, region, count, value) -> None\n\n"
"Encode the reply to a REGION_READ (with value as its count little-endian data\n"
"bytes) or REGION_WRITE (no data) and send all of it.  Raises ValueError for a\n"
"value out of range, OSError on a socket error.");

static PyObject *send_reply(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int fd;
    if (nargs != 7)
        return PyErr_Format(PyExc_TypeError, "send_reply() takes 7 arguments (%zd given)",
                            nargs);
    if (!parse_fd(args[0], &fd)) return NULL;
    static const uint64_t max[6] = {0xFFFF, 0xFFFF, UINT64_MAX, UINT32_MAX, UINT32_MAX,
                                    UINT64_MAX};
    uint64_t v[6];
    for (int i = 0; i < 6; i++) {
        PyObject *o = args[i + 1];
        if (!PyLong_Check(o)) return PyErr_Format(PyExc_TypeError, "argument %d: not an int",
                                                  i + 1);
        v[i] = PyLong_AsUnsignedLongLong(o);
        if (v[i] == (uint64_t)-1 && PyErr_Occurred()) return NULL;
        if (v[i] > max[i]) return PyErr_Format(PyExc_ValueError, "argument %d out of range",
                                               i + 1);
    }
    uint16_t msg_id = (uint16_t)v[0], command = (uint16_t)v[1];
    uint32_t region = (uint32_t)v[3], count = (uint32_t)v[4];
    uint64_t value = v[5];
    if ((command != CMD_READ && command != CMD_WRITE) || !size_ok(count) ||
        (count < 8 && (value >> (count * 8)) != 0))
        return PyErr_Format(PyExc_ValueError, "not a 1/2/4/8-byte region access reply");
    unsigned char f[FIXED + 8];
    uint32_t size = command == CMD_READ ? FIXED + count : FIXED, flags = FLAG_REPLY, zero = 0;
    memcpy(f, &msg_id, 2);
    memcpy(f + 2, &command, 2);
    memcpy(f + 4, &size, 4);
    memcpy(f + 8, &flags, 4);
    memcpy(f + 12, &zero, 4);
    memcpy(f + 16, &v[2], 8);
    memcpy(f + 24, &region, 4);
    memcpy(f + 28, &count, 4);
    if (command == CMD_READ) memcpy(f + FIXED, &value, count);
    if (send_all(fd, f, size) < 0) return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"recv_access", (PyCFunction)(void (*)(void))recv_access, METH_FASTCALL, recv_access_doc},
    {"send_reply", (PyCFunction)(void (*)(void))send_reply, METH_FASTCALL, send_reply_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "remote_hw.bridge._fastvfu",
    "The bridge's per-access socket calls in C (see remote_hw/bridge/fastpath.py).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastvfu(void) {
    return PyModule_Create(&module);
}
