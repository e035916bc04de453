/* Socket helpers shared by remote-hw's C extensions (remote_hw/net/_fastio.c and
 * remote_hw/bridge/_fastvfu.c); included by both, so each stays one self-contained
 * translation unit. */
#ifndef REMOTE_HW_SOCKIO_H
#define REMOTE_HW_SOCKIO_H

#include <Python.h>
#include <errno.h>
#include <sys/socket.h>
#include <sys/types.h>

/* Send every byte (MSG_NOSIGNAL: a peer gone away is an EPIPE, not a signal).  First
 * without blocking and without releasing the GIL: a frame of a few dozen bytes nearly
 * always fits the socket buffer; block, with the GIL released, only for the rest.
 * Returns 0, or -1 with errno set. */
static int send_all(int fd, const void *data, Py_ssize_t len) {
    const char *buf = (const char *)data;
    ssize_t n;
    do n = send(fd, buf, (size_t)len, MSG_DONTWAIT | MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n == len) return 0;
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) return -1;
    if (n < 0) n = 0;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    while (n < len) {
        ssize_t k = send(fd, buf + n, (size_t)(len - n), MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR) continue;
            err = errno;
            break;
        }
        n += k;
    }
    Py_END_ALLOW_THREADS
    if (err) { errno = err; return -1; }
    return 0;
}

#endif
