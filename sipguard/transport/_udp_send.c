/* UDP sends on a thread that never touches the GIL (sipguard/transport/udp.py: SendThread).
 *
 * On loopback and on a VM, a sendto() is far more than a copy: the kernel runs the
 * receiver's side of the datagram and wakes the receiving process, tens of microseconds that
 * were ~11 % of the event loop's time under load. Here the loop only queues a copy of each
 * datagram (a malloc and a memcpy); one plain pthread sends them with sendmmsg(), one syscall
 * per run of datagrams for the same socket, in the order they were queued. The loop wakes
 * the thread once per flush (kick), not once per datagram. Waking a sleeping thread costs CPU
 * too (a futex wake, an inter-processor interrupt, the thread's own switch in and out): while
 * the loop has time to spare, kick(True) sends the flush in the loop's thread itself, with the
 * same sendmmsg() (sipguard/transport/udp.py: SendThread, "auto").
 *
 *     Sender(capacity, max_bytes)           no thread yet; at most capacity datagrams and
 *                                           max_bytes bytes of them queued
 *     sender.start()                        run the thread (again after stop())
 *     sender.push(fd, family, data, host, port) -> bool
 *                                           queue a copy; False when the thread is not
 *                                           running, the queue is full, or host
 *                                           is no address literal of that family (the caller
 *                                           then sends in the loop)
 *     sender.kick(here=False)               wake the thread if datagrams wait; here: while
 *                                           the thread sleeps, send them in this thread
 *                                           instead, without waiting (see sender_kick)
 *     sender.stop()                         send what is queued, then end the thread (waits)
 *     sender.queued, .sent, .sent_here, .errors, .running, .idle (waits for a kick),
 *     .capacity
 *
 * A send the kernel refuses for a full socket buffer (EAGAIN) waits on poll() for room, at
 * most 100 ms, then counts as an error (once stop() was called the event loop waits for the
 * thread, so a wait is 10 ms at most and all of them 1 s at most); any other error (no
 * route, a refused address) counts as an error and the thread goes on with the next datagram. Before the loop closes a socket
 * it must stop() the sender: the thread holds file descriptors, not sockets.
 * Linux only (sendmmsg); built with the mypyc modules by ``python -m sipguard.native build``.
 * Without it, every datagram is sent in the loop.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE /* sendmmsg */
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>

#define BATCH 64       /* datagrams per sendmmsg() at most */
#define FULL_WAIT_MS 100 /* longest wait for room in a full socket buffer, per datagram */
#define STOP_WAIT_MS 10    /* the same while stop() waits */
#define STOP_BUDGET_MS 1000 /* all the waits while stop() waits */

typedef struct Out {
    struct Out *next;
    int fd;
    socklen_t alen;
    union {
        struct sockaddr_in v4;
        struct sockaddr_in6 v6;
    } addr;
    size_t len;
    char data[];
} Out;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    pthread_cond_t cv;     /* the thread waits here for datagrams; stop() for its end */
    Out *head, *tail;      /* FIFO: queued, not yet taken by the thread */
    Py_ssize_t queued;
    Py_ssize_t queued_bytes;
    Py_ssize_t capacity;
    Py_ssize_t max_bytes;
    unsigned long long sent, errors;
    unsigned long long here; /* of sent: by kick(True) in the pushing thread */
    int running;  /* the thread is alive */
    int stopping; /* stop() asked it to end once the queue is empty */
    int sleeping; /* it waits on cv */
} SenderObject;

static void
free_list(Out *out)
{
    while (out != NULL) {
        Out *next = out->next;
        PyMem_RawFree(out);
        out = next;
    }
}

/* What a send may still wait for room while stop() waits (reset when the thread starts). */
typedef struct {
    const int *stopping;
    int budget_ms;
} Waits;

static int
wait_ms(Waits *w)
{
    if (!__atomic_load_n(w->stopping, __ATOMIC_RELAXED))
        return FULL_WAIT_MS;
    int ms = w->budget_ms < STOP_WAIT_MS ? w->budget_ms : STOP_WAIT_MS;
    w->budget_ms -= ms;
    return ms;
}

/* Send msgs[0..n) on fd; returns how many were dealt with (sent, or lost to an error counted
 * in *errors). With ``waits`` a full socket buffer (EAGAIN) is waited for (poll) and that is
 * all of them; without (NULL: the event loop's thread, MSG_DONTWAIT) it stops at the first
 * datagram the buffer refuses, which is not counted. */
static unsigned int
send_run(int fd, struct mmsghdr *msgs, unsigned int n, Waits *waits, unsigned long long *errors)
{
    unsigned int off = 0;
    while (off < n) {
        int rc = sendmmsg(fd, msgs + off, n - off, waits == NULL ? MSG_DONTWAIT : 0);
        if (rc > 0) {
            off += (unsigned int)rc;
            continue;
        }
        if (rc < 0 && errno == EINTR)
            continue;
        if (rc < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (waits == NULL)
                return off; /* no room: the rest is left to the thread */
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            int ready = poll(&p, 1, wait_ms(waits));
            if (ready > 0 && !(p.revents & (POLLERR | POLLNVAL)))
                continue; /* room now: try the same datagram again */
        }
        (*errors)++; /* this datagram is lost; go on with the next */
        off++;
    }
    return off;
}

/* The next run of datagrams for one socket, from *out: at most BATCH, in msgs / iov (nodes,
 * when given: the Out of each); *out moves past them. Returns how many. */
static unsigned int
fill_run(Out **out, struct mmsghdr *msgs, struct iovec *iov, Out **nodes)
{
    Out *o = *out;
    int fd = o->fd;
    unsigned int n = 0;
    while (o != NULL && o->fd == fd && n < BATCH) {
        iov[n].iov_base = o->data;
        iov[n].iov_len = o->len;
        memset(&msgs[n].msg_hdr, 0, sizeof msgs[n].msg_hdr);
        msgs[n].msg_hdr.msg_name = &o->addr;
        msgs[n].msg_hdr.msg_namelen = o->alen;
        msgs[n].msg_hdr.msg_iov = &iov[n];
        msgs[n].msg_hdr.msg_iovlen = 1;
        msgs[n].msg_len = 0;
        if (nodes != NULL)
            nodes[n] = o;
        n++;
        o = o->next;
    }
    *out = o;
    return n;
}

/* Send a list of datagrams in order, consecutive ones on the same socket in one syscall. */
static unsigned long long
send_all(Out *out, unsigned long long *errors, Waits *waits)
{
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    unsigned long long sent = 0;
    while (out != NULL) {
        int fd = out->fd;
        unsigned int n = fill_run(&out, msgs, iov, NULL);
        unsigned long long before = *errors;
        send_run(fd, msgs, n, waits, errors); /* waits: every one dealt with */
        sent += n - (*errors - before);
    }
    return sent;
}

/* Send in the calling thread (the event loop's) without waiting: as send_all, with
 * MSG_DONTWAIT. Stops at the first datagram a full socket buffer refuses and returns it with
 * the rest of the list, unsent and in order (for the thread, which waits for room); the ones
 * sent, or lost to another error, are freed. */
static Out *
send_now(Out *out, unsigned long long *sent, unsigned long long *errors)
{
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    Out *nodes[BATCH];
    while (out != NULL) {
        int fd = out->fd;
        unsigned int n = fill_run(&out, msgs, iov, nodes);
        unsigned long long before = *errors;
        unsigned int off = send_run(fd, msgs, n, NULL, errors);
        *sent += off - (*errors - before);
        for (unsigned int i = 0; i < off; i++)
            PyMem_RawFree(nodes[i]);
        if (off < n)
            return nodes[off]; /* refused for room: it and its ->next chain, untouched */
    }
    return NULL;
}

static void *
sender_thread(void *arg)
{
    SenderObject *s = arg;
    Waits waits = {.stopping = &s->stopping, .budget_ms = STOP_BUDGET_MS};
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (s->head == NULL && !s->stopping) {
            s->sleeping = 1;
            pthread_cond_wait(&s->cv, &s->mu);
            s->sleeping = 0;
        }
        if (s->head == NULL) /* stopping, and everything is sent */
            break;
        Out *batch = s->head;
        s->head = s->tail = NULL;
        s->queued = 0;
        s->queued_bytes = 0;
        pthread_mutex_unlock(&s->mu);

        unsigned long long errors = 0;
        unsigned long long sent = send_all(batch, &errors, &waits);
        free_list(batch);

        pthread_mutex_lock(&s->mu);
        s->sent += sent;
        s->errors += errors;
    }
    s->running = 0;
    pthread_cond_broadcast(&s->cv); /* stop() waits for running == 0 */
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

static PyObject *
sender_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"capacity", "max_bytes", NULL};
    Py_ssize_t capacity, max_bytes;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "nn", kwlist, &capacity, &max_bytes))
        return NULL;
    if (capacity < 1 || max_bytes < 1) {
        PyErr_SetString(PyExc_ValueError, "capacity and max_bytes must be at least 1");
        return NULL;
    }
    SenderObject *s = (SenderObject *)type->tp_alloc(type, 0);
    if (s == NULL)
        return NULL;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    s->capacity = capacity;
    s->max_bytes = max_bytes;
    return (PyObject *)s;
}

/* Send what is queued, end the thread and wait for it (without the GIL). */
static void
sender_stop_thread(SenderObject *s)
{
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&s->mu);
    if (s->running) {
        __atomic_store_n(&s->stopping, 1, __ATOMIC_RELAXED); /* read by send_run (wait_ms) unlocked */
        pthread_cond_broadcast(&s->cv);
        while (s->running)
            pthread_cond_wait(&s->cv, &s->mu);
    }
    s->stopping = 0;
    pthread_mutex_unlock(&s->mu);
    Py_END_ALLOW_THREADS
}

static void
sender_dealloc(SenderObject *s)
{
    sender_stop_thread(s); /* the thread holds a pointer to this object */
    free_list(s->head);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyObject *
sender_start(SenderObject *s, PyObject *Py_UNUSED(ignored))
{
    pthread_mutex_lock(&s->mu);
    int rc = 0;
    if (!s->running) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 256 * 1024);
        rc = pthread_create(&thread, &attr, sender_thread, s);
        pthread_attr_destroy(&attr);
        if (rc == 0)
            s->running = 1;
    }
    pthread_mutex_unlock(&s->mu);
    if (rc != 0) {
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *
sender_stop(SenderObject *s, PyObject *Py_UNUSED(ignored))
{
    sender_stop_thread(s);
    Py_RETURN_NONE;
}

/* An address literal of the socket's family (an IPv4 one on an IPv6 socket: v4-mapped). */
static int
parse_addr(Out *out, int family, const char *host, long port)
{
    if (family == AF_INET) {
        memset(&out->addr.v4, 0, sizeof out->addr.v4);
        out->addr.v4.sin_family = AF_INET;
        out->addr.v4.sin_port = htons((uint16_t)port);
        out->alen = sizeof out->addr.v4;
        return inet_pton(AF_INET, host, &out->addr.v4.sin_addr) == 1;
    }
    if (family == AF_INET6) {
        memset(&out->addr.v6, 0, sizeof out->addr.v6);
        out->addr.v6.sin6_family = AF_INET6;
        out->addr.v6.sin6_port = htons((uint16_t)port);
        out->alen = sizeof out->addr.v6;
        if (strchr(host, ':') != NULL)
            return inet_pton(AF_INET6, host, &out->addr.v6.sin6_addr) == 1;
        struct in_addr v4;
        if (inet_pton(AF_INET, host, &v4) != 1)
            return 0;
        out->addr.v6.sin6_addr.s6_addr[10] = 0xff;
        out->addr.v6.sin6_addr.s6_addr[11] = 0xff;
        memcpy(&out->addr.v6.sin6_addr.s6_addr[12], &v4, 4);
        return 1;
    }
    return 0;
}

static PyObject *
sender_push(SenderObject *s, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 || !PyLong_Check(args[0]) || !PyLong_Check(args[1]) || !PyBytes_Check(args[2])
            || !PyUnicode_Check(args[3]) || !PyLong_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError,
                        "push(fd: int, family: int, data: bytes, host: str, port: int)");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    long family = PyLong_AsLong(args[1]);
    long port = PyLong_AsLong(args[4]);
    if (PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT32_MAX || port < 0 || port > 65535) {
        PyErr_SetString(PyExc_ValueError, "fd or port out of range");
        return NULL;
    }
    Py_ssize_t size = PyBytes_GET_SIZE(args[2]);
    if (!s->running || s->stopping) /* set only by the loop's own start() and stop() */
        Py_RETURN_FALSE;
    Py_ssize_t hlen;
    const char *host = PyUnicode_AsUTF8AndSize(args[3], &hlen);
    if (host == NULL)
        return NULL;
    if (hlen >= INET6_ADDRSTRLEN || (Py_ssize_t)strlen(host) != hlen)
        Py_RETURN_FALSE; /* a name, a scoped address or a NUL: not for the thread */
    size_t len = (size_t)size;
    Out *out = PyMem_RawMalloc(sizeof(Out) + len);
    if (out == NULL)
        return PyErr_NoMemory();
    if (!parse_addr(out, (int)family, host, port)) {
        PyMem_RawFree(out);
        Py_RETURN_FALSE;
    }
    out->next = NULL;
    out->fd = (int)fd;
    out->len = len;
    memcpy(out->data, PyBytes_AS_STRING(args[2]), len);
    pthread_mutex_lock(&s->mu); /* the bound with the counts the thread resets */
    if (s->queued >= s->capacity || s->queued_bytes > s->max_bytes - size) {
        pthread_mutex_unlock(&s->mu);
        PyMem_RawFree(out);
        Py_RETURN_FALSE;
    }
    if (s->tail != NULL)
        s->tail->next = out;
    else
        s->head = out;
    s->tail = out;
    s->queued++;
    s->queued_bytes += size;
    pthread_mutex_unlock(&s->mu);
    Py_RETURN_TRUE;
}

/* kick(here=False): wake the thread for what is queued. kick(True): while the thread
 * sleeps (nothing of its in flight), send the queue in this thread instead, without waiting
 * (send_now); what a full socket buffer refuses goes back to the head of the queue, for the
 * thread. Only the thread that pushes may kick: nothing is pushed meanwhile, so the order
 * holds. */
static PyObject *
sender_kick(SenderObject *s, PyObject *const *args, Py_ssize_t nargs)
{
    int here = nargs > 0 ? PyObject_IsTrue(args[0]) : 0;
    if (here < 0)
        return NULL;
    pthread_mutex_lock(&s->mu);
    if (s->head == NULL || !s->sleeping) { /* nothing queued, or the thread takes it next */
        pthread_mutex_unlock(&s->mu);
        Py_RETURN_NONE;
    }
    if (!here || s->stopping) {
        pthread_cond_signal(&s->cv);
        pthread_mutex_unlock(&s->mu);
        Py_RETURN_NONE;
    }
    Out *batch = s->head;
    s->head = s->tail = NULL;
    s->queued = 0;
    s->queued_bytes = 0;
    pthread_mutex_unlock(&s->mu);

    unsigned long long sent = 0, errors = 0;
    Out *rest = send_now(batch, &sent, &errors);

    pthread_mutex_lock(&s->mu);
    s->sent += sent;
    s->here += sent;
    s->errors += errors;
    if (rest != NULL) {
        Out *last = rest;
        Py_ssize_t n = 1, bytes = (Py_ssize_t)rest->len;
        while (last->next != NULL) {
            last = last->next;
            n++;
            bytes += (Py_ssize_t)last->len;
        }
        last->next = s->head;
        if (s->head == NULL)
            s->tail = last;
        s->head = rest;
        s->queued += n;
        s->queued_bytes += bytes;
        if (s->sleeping)
            pthread_cond_signal(&s->cv);
    }
    pthread_mutex_unlock(&s->mu);
    Py_RETURN_NONE;
}

static PyObject *
get_queued(SenderObject *s, void *closure)
{
    pthread_mutex_lock(&s->mu);
    Py_ssize_t n = s->queued;
    pthread_mutex_unlock(&s->mu);
    return PyLong_FromSsize_t(n);
}

/* sent, errors: the closure is the count's offset in SenderObject */
static PyObject *
get_count(SenderObject *s, void *closure)
{
    pthread_mutex_lock(&s->mu);
    unsigned long long n = *(unsigned long long *)((char *)s + (size_t)closure);
    pthread_mutex_unlock(&s->mu);
    return PyLong_FromUnsignedLongLong(n);
}

static PyObject *
get_running(SenderObject *s, void *closure)
{
    pthread_mutex_lock(&s->mu);
    int running = s->running && !s->stopping;
    pthread_mutex_unlock(&s->mu);
    return PyBool_FromLong(running);
}

static PyObject *
get_idle(SenderObject *s, void *closure)
{
    pthread_mutex_lock(&s->mu);
    int idle = s->sleeping;
    pthread_mutex_unlock(&s->mu);
    return PyBool_FromLong(idle);
}

static PyObject *
get_capacity(SenderObject *s, void *closure)
{
    return PyLong_FromSsize_t(s->capacity);
}

static int
set_capacity(SenderObject *s, PyObject *value, void *closure)
{
    Py_ssize_t n = value == NULL ? -1 : PyLong_AsSsize_t(value);
    if (n == -1 && PyErr_Occurred())
        return -1;
    if (n < 1) {
        PyErr_SetString(PyExc_ValueError, "capacity must be at least 1");
        return -1;
    }
    s->capacity = n;
    return 0;
}

static PyMethodDef sender_methods[] = {
    {"start", (PyCFunction)sender_start, METH_NOARGS, "Run the thread."},
    {"push", (PyCFunction)(void (*)(void))sender_push, METH_FASTCALL,
     "push(fd, family, data, host, port) -> bool: queue a copy of a datagram."},
    {"kick", (PyCFunction)(void (*)(void))sender_kick, METH_FASTCALL,
     "kick(here=False): wake the thread for the datagrams queued; here: while it sleeps, "
     "send them in this thread, without waiting."},
    {"stop", (PyCFunction)sender_stop, METH_NOARGS, "Send what is queued, end the thread."},
    {NULL},
};

static PyGetSetDef sender_getset[] = {
    {"queued", (getter)get_queued, NULL, "Datagrams queued, not yet taken by the thread.", NULL},
    {"sent", (getter)get_count, NULL, "Datagrams sent (by the thread, or by kick(True)).",
     (void *)offsetof(SenderObject, sent)},
    {"sent_here", (getter)get_count, NULL, "Of sent: by kick(True), in the pushing thread.",
     (void *)offsetof(SenderObject, here)},
    {"errors", (getter)get_count, NULL, "Datagrams the thread could not send.",
     (void *)offsetof(SenderObject, errors)},
    {"running", (getter)get_running, NULL, "The thread runs and takes datagrams.", NULL},
    {"idle", (getter)get_idle, NULL, "The thread waits for a kick.", NULL},
    {"capacity", (getter)get_capacity, (setter)set_capacity,
     "Datagrams that may be queued at most.", NULL},
    {NULL},
};

static PyTypeObject SenderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sipguard.transport._udp_send.Sender",
    .tp_basicsize = sizeof(SenderObject),
    .tp_dealloc = (destructor)sender_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "UDP datagrams sent in order on a thread without the GIL.",
    .tp_methods = sender_methods,
    .tp_getset = sender_getset,
    .tp_new = sender_new,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sipguard.transport._udp_send",
    "UDP sends on a thread that never touches the GIL.", -1, NULL,
};

PyMODINIT_FUNC
PyInit__udp_send(void)
{
    if (PyType_Ready(&SenderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&SenderType);
    if (PyModule_AddObject(m, "Sender", (PyObject *)&SenderType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
