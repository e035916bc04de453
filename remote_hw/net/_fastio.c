/*
 * remote_hw.net._fastio: the hot path's socket calls, in C.
 *
 * Why this exists: on this class of machine a forwarded register read is a KVM exit,
 * one TCP round trip and a few dozen Python bytecodes at each end, and right after a
 * KVM exit or a context switch those bytecodes run 2-3x slower than in a warm loop
 * (cold caches).  Folding "send the request, wait, parse the answer" (client) and
 * "wait, parse the request" / "encode and send the feedback" (server) into one C call
 * each removes most of that.  Everything that is not the single common frame -- a
 * partial frame, two frames in one read, an unknown id, any other message type, a bad
 * field -- is returned as raw bytes, and the caller feeds it to the pure-Python
 * protocol.Connection, which decodes it or raises the precise error.  So this file
 * never decides that input is malformed; it only recognises the well-formed common
 * case.
 *
 * The frame layouts mirror remote_hw/protocol/messages.py (the one definition).
 * remote_hw/net/fastio.py checks this mirror against the Python codec at import, with
 * frames the codec encodes, and refuses to use it if they disagree.
 *
 * Little-endian host assumed (x86-64, like the KVM structs elsewhere).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>

#include "_sockio.h"  /* send_all */

/* Frame header: magic "RH" (u16), type (u8), flags (u8), payload length (u32). */
#define HDR 8
#define MAGIC0 'R'
#define MAGIC1 'H'
#define T_IO_REQUEST 3
#define T_FEEDBACK 4
#define T_POST 14

/* IO_REQUEST payload, "<QIIQQBBBBBB" then server id and device id bytes. */
#define IO_FIXED 38
#define IO_RID 0
#define IO_VM 8
#define IO_CID 12
#define IO_OFF 16
#define IO_DATA 24
#define IO_KIND 32
#define IO_SIZE 33
#define IO_DIR 34
#define IO_HOPS 35
#define IO_LS 36
#define IO_LD 37

/* FEEDBACK payload, "<QIIHBxQ". */
#define FB_LEN 28
#define FB_RID 0
#define FB_VM 8
#define FB_CID 12
#define FB_STATUS 16
#define FB_SIZE 18
#define FB_PAD 19
#define FB_DATA 20

/* One read; a larger burst stays in the socket for the next read. */
#define RECV_CAP 16384

/* Set by configure() from the Python codec, so valid values have one definition. */
static PyObject *id_cache = NULL;      /* dict: valid id bytes -> str (codec._ID_STR) */
static PyObject *id_bytes = NULL;      /* dict: valid id str -> bytes (codec._ID_BYTES) */
static PyObject *opt_id_bytes = NULL;  /* the same, with "" -> b"" (codec._OPT_ID_BYTES) */
static PyObject *s_acquire = NULL, *s_release = NULL;
static uint64_t status_ok = 0;         /* bit n: status n is valid */
static uint32_t kind_ok = 0, dir_ok = 0;
static PyObject *empty_str = NULL;
static PyObject *one = NULL;           /* the int 1: a POST's direction (WRITE) */
/* protocol.IoRequestFields, a NamedTuple: recv_io returns instances of it, so callers
 * read f.device_id rather than f[10].  A NamedTuple is a tuple subclass with no
 * per-instance dict (__slots__ = ()), so its tp_alloc gives a tuple of the right type
 * whose items are set exactly as PyTuple_New's (what tuple.__new__ itself does for a
 * subclass). */
static PyTypeObject *io_fields_type = NULL;
#define IO_NFIELDS 11
/* A subclass instance cannot come from the tuple free list, and its allocation and
 * deallocation cost more than a plain tuple's, once per request.  So, as CPython's own
 * zip() and enumerate() do with their result tuples, recv_io refills a result that
 * every caller has let go of (its only reference is this pool's) instead of making a
 * new one.  Two slots: a server loop still holds the previous result while it asks
 * for the next; any other caller that keeps results just gets fresh ones. */
#define IO_POOL 2
static PyObject *io_pool[IO_POOL];

static inline uint16_t rd16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t rd32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t rd64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static inline int size_ok(unsigned size, int zero_ok) {
    return size == 1 || size == 2 || size == 4 || size == 8 || (zero_ok && size == 0);
}

static inline int fits(uint64_t data, unsigned size) {
    return size >= 8 || (data >> (size * 8)) == 0;
}


/* One recv() with the GIL released.  A signal that interrupts it (a vCPU kick, Ctrl-C)
 * runs its Python handler, as PEP 475 has Python's own calls do, and then counts as
 * the end of a read slice (EAGAIN), not as a reason to read again: a retried recv()
 * restarts the socket's whole receive timeout, so signals arriving faster than that
 * timeout would keep a caller here forever, past its request's deadline.  The caller
 * checks its deadline and reads again.  Returns the count, 0 at EOF, -1 with errno
 * (EAGAIN: a slice ended), or -2 with a Python error set (a handler raised). */
static ssize_t recv_once(int fd, unsigned char *buf) {
    ssize_t n;
    int err;
    Py_BEGIN_ALLOW_THREADS
    n = recv(fd, buf, RECV_CAP, 0);
    err = errno;
    Py_END_ALLOW_THREADS
    if (n < 0 && err == EINTR) {
        if (PyErr_CheckSignals() < 0) return -2;
        err = EAGAIN;
    }
    if (n < 0) errno = err;
    return n;
}

/* The result of a read that is not the common frame: bytes, b"" (EOF), None (timeout). */
static PyObject *uncommon(ssize_t n, const unsigned char *buf) {
    if (n == -2) return NULL;  /* a signal handler raised */
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) Py_RETURN_NONE;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyBytes_FromStringAndSize((const char *)buf, n);
}

static inline int header_is(const unsigned char *b, unsigned type, uint32_t *len) {
    if (b[0] != MAGIC0 || b[1] != MAGIC1 || b[2] != type || b[3] != 0) return 0;
    *len = rd32(b + 4);
    return 1;
}

/* A valid FEEDBACK payload? (mirrors codec.feedback_fields) */
static int feedback_ok(const unsigned char *p) {
    unsigned st = rd16(p + FB_STATUS), size = p[FB_SIZE];
    return p[FB_PAD] == 0 && st < 64 && (status_ok >> st & 1) && size_ok(size, 1) &&
           fits(rd64(p + FB_DATA), size);
}

/* n Python ints, each in 0..max[i], into out; 0 when one is not (no error is left set:
 * the caller hands such values to the codec, which says what is wrong with them). */
static int take_uints(PyObject *const *args, int n, const uint64_t *max, uint64_t *out) {
    for (int i = 0; i < n; i++) {
        if (!PyLong_Check(args[i])) return 0;
        out[i] = PyLong_AsUnsignedLongLong(args[i]);
        if (out[i] == (uint64_t)-1 && PyErr_Occurred()) {
            PyErr_Clear();  /* negative or wider than 64 bits */
            return 0;
        }
        if (out[i] > max[i]) return 0;
    }
    return 1;
}

static int parse_fd(PyObject *arg, int *fd) {
    *fd = (int)PyLong_AsLong(arg);
    return !(*fd == -1 && PyErr_Occurred());
}

PyDoc_STRVAR(configure_doc,
"configure(id_str, id_bytes, opt_id_bytes, statuses, kinds, dirs, io_fields)\n\n"
"The codec's caches of valid ids (bytes -> str; str -> bytes; the same with \"\"),\n"
"bit masks of the valid status, access kind and direction values, and the named\n"
"tuple class recv_io returns (protocol.IoRequestFields).");

static PyObject *configure(PyObject *self, PyObject *args) {
    PyObject *cache, *enc, *opt_enc, *cls;
    unsigned long long st;
    unsigned int kinds, dirs;
    if (!PyArg_ParseTuple(args, "O!O!O!KIIO!", &PyDict_Type, &cache, &PyDict_Type, &enc,
                          &PyDict_Type, &opt_enc, &st, &kinds, &dirs, &PyType_Type, &cls))
        return NULL;
    PyTypeObject *t = (PyTypeObject *)cls;
    /* Built like a plain tuple below: only a tuple subclass that adds no storage. */
    if (!PyType_IsSubtype(t, &PyTuple_Type) || t->tp_basicsize != PyTuple_Type.tp_basicsize ||
        t->tp_itemsize != PyTuple_Type.tp_itemsize || t->tp_dictoffset != 0)
        return PyErr_Format(PyExc_TypeError, "io_fields must be a NamedTuple class, not %R",
                            cls);
    Py_XSETREF(io_fields_type, (PyTypeObject *)Py_NewRef(cls));
    for (int i = 0; i < IO_POOL; i++) Py_CLEAR(io_pool[i]);  /* of the previous class */
    Py_XSETREF(id_cache, Py_NewRef(cache));
    Py_XSETREF(id_bytes, Py_NewRef(enc));
    Py_XSETREF(opt_id_bytes, Py_NewRef(opt_enc));
    status_ok = st;
    kind_ok = kinds;
    dir_ok = dirs;
    Py_RETURN_NONE;
}

/* Read once and return (status, value) for the common answer, else as uncommon(). */
static PyObject *read_feedback(int fd, uint64_t rid) {
    unsigned char buf[RECV_CAP];
    ssize_t n = recv_once(fd, buf);
    uint32_t len;
    if (n == HDR + FB_LEN && header_is(buf, T_FEEDBACK, &len) && len == FB_LEN &&
        rd64(buf + HDR + FB_RID) == rid && feedback_ok(buf + HDR)) {
        const unsigned char *p = buf + HDR;
        PyObject *t = PyTuple_New(2);
        if (t == NULL) return NULL;
        PyTuple_SET_ITEM(t, 0, PyLong_FromLong(rd16(p + FB_STATUS)));
        PyTuple_SET_ITEM(t, 1, PyLong_FromUnsignedLongLong(rd64(p + FB_DATA)));
        if (PyTuple_GET_ITEM(t, 0) == NULL || PyTuple_GET_ITEM(t, 1) == NULL) {
            Py_DECREF(t);  /* tuple dealloc skips NULL items */
            return NULL;
        }
        return t;
    }
    return uncommon(n, buf);
}

PyDoc_STRVAR(request_doc,
"request(fd, wlock, request_id, vm_id, client_id, offset, data, kind, size,\n"
"        direction, hops, server_id, device_id) -> (status, value) | bytes | None\n\n"
"Client: encode one IO_REQUEST (arguments in wire order, as\n"
"codec.encode_io_request), send it holding wlock, then read once.  The common\n"
"answer, exactly one valid FEEDBACK for request_id, is returned as (status, value);\n"
"anything else as the bytes read (b\"\" at EOF), or None when the socket's\n"
"receive timeout passed.  NotImplemented, with nothing sent, when an id is not\n"
"yet known to the codec or a value is out of range: the caller then takes the\n"
"codec's path.");

/* Encode an IO_REQUEST or a POST (the same layout) from the Python arguments
 * args[0..10] = request_id, vm_id, client_id, offset, data, kind, size, direction,
 * hops, server_id, device_id into f (HDR + IO_FIXED + 2 * 255 bytes).  Returns the
 * frame's length, 0 when the codec's path must take it (an unknown id, a value out
 * of range), -1 with a Python error set. */
static Py_ssize_t encode_io(unsigned char *f, unsigned char type, PyObject *const *args) {
    uint64_t v[9];
    static const uint64_t max[9] = {UINT64_MAX, UINT32_MAX, UINT32_MAX, UINT64_MAX,
                                    UINT64_MAX, 255, 255, 255, 255};
    if (!take_uints(args, 9, max, v)) return 0;
    uint64_t rid = v[0], data = v[4];
    unsigned kind = (unsigned)v[5], size = (unsigned)v[6], dir = (unsigned)v[7];
    if (kind >= 32 || !(kind_ok >> kind & 1) || dir >= 32 || !(dir_ok >> dir & 1) ||
        !size_ok(size, 0) || !fits(data, size) || (type == T_POST && dir != 1))
        return 0;
    /* Borrowed references to the cached encodings; unknown ids go the codec's way. */
    PyObject *sid = PyUnicode_CheckExact(args[9]) ?
        PyDict_GetItemWithError(opt_id_bytes, args[9]) : NULL;
    if (sid == NULL || !PyBytes_CheckExact(sid)) return PyErr_Occurred() ? -1 : 0;
    PyObject *did = PyUnicode_CheckExact(args[10]) ?
        PyDict_GetItemWithError(id_bytes, args[10]) : NULL;
    if (did == NULL || !PyBytes_CheckExact(did)) return PyErr_Occurred() ? -1 : 0;
    Py_ssize_t ls = PyBytes_GET_SIZE(sid), ld = PyBytes_GET_SIZE(did);
    if (ls > 255 || ld < 1 || ld > 255) return 0;
    uint32_t len = (uint32_t)(IO_FIXED + ls + ld), vm32 = (uint32_t)v[1],
             cid32 = (uint32_t)v[2];
    f[0] = MAGIC0; f[1] = MAGIC1; f[2] = type; f[3] = 0;
    memcpy(f + 4, &len, 4);
    unsigned char *p = f + HDR;
    memcpy(p + IO_RID, &rid, 8);
    memcpy(p + IO_VM, &vm32, 4);
    memcpy(p + IO_CID, &cid32, 4);
    memcpy(p + IO_OFF, &v[3], 8);
    memcpy(p + IO_DATA, &data, 8);
    p[IO_KIND] = (unsigned char)kind;
    p[IO_SIZE] = (unsigned char)size;
    p[IO_DIR] = (unsigned char)dir;
    p[IO_HOPS] = (unsigned char)v[8];
    p[IO_LS] = (unsigned char)ls;
    p[IO_LD] = (unsigned char)ld;
    memcpy(p + IO_FIXED, PyBytes_AS_STRING(sid), ls);
    memcpy(p + IO_FIXED + ls, PyBytes_AS_STRING(did), ld);
    return HDR + len;
}

/* send_all() of one frame holding the Python lock wlock (other threads write to this
 * socket too: followers' requests, posts, pongs).  0, or -1 with a Python error set. */
static int send_locked(PyObject *wlock, int fd, const unsigned char *f, Py_ssize_t n) {
    PyObject *r = PyObject_CallMethodNoArgs(wlock, s_acquire);
    if (r == NULL) return -1;
    Py_DECREF(r);
    int sent = send_all(fd, (const char *)f, (size_t)n);
    int err = errno;
    r = PyObject_CallMethodNoArgs(wlock, s_release);
    if (r == NULL) return -1;
    Py_DECREF(r);
    if (sent < 0) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static PyObject *request(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int fd;
    if (nargs != 13)
        return PyErr_Format(PyExc_TypeError, "request() takes 13 arguments (%zd given)", nargs);
    if (id_bytes == NULL) return PyErr_Format(PyExc_RuntimeError, "not configured");
    if (!parse_fd(args[0], &fd)) return NULL;
    unsigned char f[HDR + IO_FIXED + 255 * 2];
    Py_ssize_t n = encode_io(f, T_IO_REQUEST, args + 2);
    if (n < 0) return NULL;
    if (n == 0) Py_RETURN_NOTIMPLEMENTED;
    if (send_locked(args[1], fd, f, n) < 0) return NULL;
    return read_feedback(fd, rd64(f + HDR + IO_RID));
}

PyDoc_STRVAR(post_doc,
"post(fd, wlock, request_id, vm_id, client_id, offset, data, kind, size,\n"
"     hops, server_id, device_id) -> bool\n\n"
"Client: encode one POST (a write answered only when it fails; arguments in wire\n"
"order, as codec.encode_post) and send it holding wlock; nothing is read.  False,\n"
"with nothing sent, when an id is not yet known to the codec or a value is out of\n"
"range: the caller then takes the codec's path.");

static PyObject *post(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int fd;
    if (nargs != 12)
        return PyErr_Format(PyExc_TypeError, "post() takes 12 arguments (%zd given)", nargs);
    if (id_bytes == NULL) return PyErr_Format(PyExc_RuntimeError, "not configured");
    if (!parse_fd(args[0], &fd)) return NULL;
    /* The IO_REQUEST argument order with direction (WRITE) put back in its place. */
    PyObject *a[11] = {args[2], args[3], args[4], args[5], args[6], args[7], args[8],
                       one, args[9], args[10], args[11]};
    unsigned char f[HDR + IO_FIXED + 255 * 2];
    Py_ssize_t n = encode_io(f, T_POST, a);
    if (n < 0) return NULL;
    if (n == 0) Py_RETURN_FALSE;
    if (send_locked(args[1], fd, f, n) < 0) return NULL;
    Py_RETURN_TRUE;
}

/* The cached str for a valid id, or NULL (not an error) when unknown. */
static PyObject *id_lookup(const unsigned char *p, unsigned len) {
    PyObject *key = PyBytes_FromStringAndSize((const char *)p, len);
    if (key == NULL) return NULL;
    PyObject *s = PyDict_GetItemWithError(id_cache, key);
    Py_DECREF(key);
    Py_XINCREF(s);
    return s;
}

PyDoc_STRVAR(recv_io_doc,
"recv_io(fd) -> IoRequestFields | bytes | None\n\n"
"Server: read once.  If the read is exactly one valid IO_REQUEST whose ids are\n"
"known, return its fields as codec.io_request_fields does (an instance of the\n"
"class given to configure()); else the bytes read\n"
"(b\"\" at EOF), or None when the socket's receive timeout passed.");

static PyObject *recv_io(PyObject *self, PyObject *arg) {
    int fd;
    unsigned char buf[RECV_CAP];
    if (!parse_fd(arg, &fd)) return NULL;
    if (id_cache == NULL || io_fields_type == NULL)
        return PyErr_Format(PyExc_RuntimeError, "not configured");
    ssize_t n = recv_once(fd, buf);
    uint32_t len;
    if (n < HDR + IO_FIXED || !header_is(buf, T_IO_REQUEST, &len) || (ssize_t)len != n - HDR)
        return uncommon(n, buf);
    const unsigned char *p = buf + HDR;
    unsigned ls = p[IO_LS], ld = p[IO_LD], size = p[IO_SIZE], kind = p[IO_KIND],
             dir = p[IO_DIR];
    uint64_t data = rd64(p + IO_DATA);
    if (IO_FIXED + ls + ld != len || ld == 0 || kind >= 32 || !(kind_ok >> kind & 1) ||
        dir >= 32 || !(dir_ok >> dir & 1) || !size_ok(size, 0) || !fits(data, size))
        return uncommon(n, buf);
    PyObject *sid, *did;
    if (ls) {
        sid = id_lookup(p + IO_FIXED, ls);
        if (sid == NULL) return PyErr_Occurred() ? NULL : uncommon(n, buf);
    } else {
        sid = Py_NewRef(empty_str);
    }
    did = id_lookup(p + IO_FIXED + ls, ld);
    if (did == NULL) {
        Py_DECREF(sid);
        return PyErr_Occurred() ? NULL : uncommon(n, buf);
    }
    /* Built by hand: Py_BuildValue would parse a format string on every request, and
     * calling the class would run its Python __new__.  Every item is made before the
     * result is touched, so nothing below allocates (or lets another thread in) while
     * a pooled result is half refilled. */
    PyObject *items[IO_NFIELDS] = {
        PyLong_FromUnsignedLongLong(rd64(p + IO_RID)), PyLong_FromUnsignedLong(rd32(p + IO_VM)),
        PyLong_FromUnsignedLong(rd32(p + IO_CID)), PyLong_FromUnsignedLongLong(rd64(p + IO_OFF)),
        PyLong_FromUnsignedLongLong(data), PyLong_FromLong(kind), PyLong_FromLong(size),
        PyLong_FromLong(dir), PyLong_FromLong(p[IO_HOPS]), sid, did,
    };
    for (int i = 0; i < IO_NFIELDS - 2; i++) {
        if (items[i] == NULL) {
            for (int k = 0; k < IO_NFIELDS; k++) Py_XDECREF(items[k]);
            return NULL;
        }
    }
    PyObject *t = NULL;
    for (int i = 0; i < IO_POOL; i++) {
        if (io_pool[i] != NULL && Py_REFCNT(io_pool[i]) == 1) {  /* nobody else holds it */
            t = Py_NewRef(io_pool[i]);
            break;
        }
    }
    if (t != NULL) {
        PyObject *old[IO_NFIELDS];
        for (int i = 0; i < IO_NFIELDS; i++) {  /* steals items[i] */
            old[i] = PyTuple_GET_ITEM(t, i);
            PyTuple_SET_ITEM(t, i, items[i]);
        }
        for (int i = 0; i < IO_NFIELDS; i++) Py_DECREF(old[i]);  /* whole again first */
        if (!PyObject_GC_IsTracked(t)) PyObject_GC_Track(t);
        return t;
    }
    t = io_fields_type->tp_alloc(io_fields_type, IO_NFIELDS);
    if (t == NULL) {
        for (int k = 0; k < IO_NFIELDS; k++) Py_DECREF(items[k]);
        return NULL;
    }
    for (int i = 0; i < IO_NFIELDS; i++) PyTuple_SET_ITEM(t, i, items[i]);  /* steals */
    for (int i = 0; i < IO_POOL; i++) {
        if (io_pool[i] == NULL) {
            io_pool[i] = Py_NewRef(t);
            break;
        }
    }
    return t;
}

PyDoc_STRVAR(send_feedback_doc,
"send_feedback(fd, request_id, vm_id, client_id, status, size, data) -> bool\n\n"
"Server: encode one FEEDBACK and send it.  False (nothing sent) when a value is\n"
"out of range: the caller then takes the codec's path, which says why.");

static PyObject *send_feedback(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int fd;
    if (nargs != 7)
        return PyErr_Format(PyExc_TypeError, "send_feedback() takes 7 arguments (%zd given)",
                            nargs);
    if (!parse_fd(args[0], &fd)) return NULL;
    /* No format-string parsing: this runs once per request. */
    uint64_t v[6];
    static const uint64_t max[6] = {UINT64_MAX, UINT32_MAX, UINT32_MAX, 63, 8, UINT64_MAX};
    if (!take_uints(args + 1, 6, max, v)) Py_RETURN_FALSE;
    uint64_t rid = v[0], vm = v[1], cid = v[2], data = v[5];
    unsigned int status = (unsigned int)v[3], size = (unsigned int)v[4];
    if (!(status_ok >> status & 1) || !size_ok(size, 1) || !fits(data, size))
        Py_RETURN_FALSE;
    unsigned char f[HDR + FB_LEN];
    uint32_t len = FB_LEN, vm32 = (uint32_t)vm, cid32 = (uint32_t)cid;
    uint16_t st = (uint16_t)status;
    f[0] = MAGIC0; f[1] = MAGIC1; f[2] = T_FEEDBACK; f[3] = 0;
    memcpy(f + 4, &len, 4);
    unsigned char *p = f + HDR;
    memcpy(p + FB_RID, &rid, 8);
    memcpy(p + FB_VM, &vm32, 4);
    memcpy(p + FB_CID, &cid32, 4);
    memcpy(p + FB_STATUS, &st, 2);
    p[FB_SIZE] = (unsigned char)size;
    p[FB_PAD] = 0;
    memcpy(p + FB_DATA, &data, 8);
    if (send_all(fd, (const char *)f, sizeof f) < 0) return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_TRUE;
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS, configure_doc},
    {"request", (PyCFunction)(void (*)(void))request, METH_FASTCALL, request_doc},
    {"post", (PyCFunction)(void (*)(void))post, METH_FASTCALL, post_doc},
    {"recv_io", recv_io, METH_O, recv_io_doc},
    {"send_feedback", (PyCFunction)(void (*)(void))send_feedback, METH_FASTCALL,
     send_feedback_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "remote_hw.net._fastio",
    "The hot path's socket calls in C (see remote_hw/net/fastio.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastio(void) {
    empty_str = PyUnicode_FromString("");
    one = PyLong_FromLong(1);
    if (one == NULL) return NULL;
    s_acquire = PyUnicode_InternFromString("acquire");
    s_release = PyUnicode_InternFromString("release");
    if (empty_str == NULL || s_acquire == NULL || s_release == NULL) return NULL;
    return PyModule_Create(&module);
}
