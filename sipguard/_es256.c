/* ES256 signature checks on threads that never touch the GIL (sipguard/verify_threads.py).
 *
 * A PASSporT's signature check is ~70 us of P-256 arithmetic. Done on a Python thread, it
 * costs more than it saves: the thread needs the GIL to start and to end each check, and every
 * hand-over of the GIL between two busy threads is a pair of context switches that stalls the
 * event loop. Here the threads are plain pthreads: they take a job (a copy of the signed bytes,
 * the 64-byte r || s, a reference to the key), verify it with OpenSSL (SHA-256 + ECDSA: the
 * arithmetic ``cryptography`` uses, see verify()), queue the answer and wake the event loop
 * through an eventfd — the loop then collects every ready answer at once with ``take``.
 *
 *     key(der) -> Key                      a SubjectPublicKeyInfo (P-256 only) for submit
 *     Pool(capacity)                       a pool with no thread yet
 *     pool.threads(n)                      run n threads (surplus ones end after the queue)
 *     pool.submit(token, key, data, sig)   -> bool: False when capacity jobs already wait
 *     pool.take() -> [(token, valid)]      answers ready (clears the eventfd)
 *     pool.fd, pool.waiting, pool.running  the eventfd to watch; jobs not yet taken; threads
 *     pool.close()                         ends every thread once the queue is empty
 *
 * ``valid`` is 1 for a good signature, 0 for anything else OpenSSL refuses (as
 * ``cryptography`` does: r or s out of range, a wrong key, a wrong digest), -1 when a check
 * could not be set up (no memory): the caller treats that as an error.
 * Linux only (eventfd); built with the mypyc modules by ``python -m sipguard.native build``,
 * against the system's libcrypto. Without it, the checks run in the event loop.
 */
#define PY_SSIZE_T_CLEAN
#define OPENSSL_SUPPRESS_DEPRECATED /* EC_KEY, ECDSA_do_verify: see verify() */
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/ecdsa.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

static EVP_MD *sha256; /* fetched once: an implicit fetch per check costs a lookup and a lock */

/* ------------------------------------------------------------------ Key */

/* A signer's public key as OpenSSL holds it; a job holds references of its own. */
typedef struct {
    EVP_PKEY *pkey;
#ifndef OPENSSL_NO_DEPRECATED_3_0
    EC_KEY *ec; /* the same key for ECDSA_do_verify */
#endif
} Signer;

static void
signer_ref(Signer *signer)
{
    EVP_PKEY_up_ref(signer->pkey);
#ifndef OPENSSL_NO_DEPRECATED_3_0
    EC_KEY_up_ref(signer->ec);
#endif
}

static void
signer_free(Signer *signer)
{
    EVP_PKEY_free(signer->pkey);
#ifndef OPENSSL_NO_DEPRECATED_3_0
    EC_KEY_free(signer->ec);
#endif
}

typedef struct {
    PyObject_HEAD
    Signer signer;
} KeyObject;

static void
key_dealloc(KeyObject *self)
{
    signer_free(&self->signer);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject KeyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sipguard._es256.Key",
    .tp_basicsize = sizeof(KeyObject),
    .tp_dealloc = (destructor)key_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A P-256 public key for Pool.submit (made by key()).",
};

static PyObject *
es256_key(PyObject *module, PyObject *arg)
{
    Py_buffer der;
    if (PyObject_GetBuffer(arg, &der, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *p = der.buf;
    EVP_PKEY *pkey = d2i_PUBKEY(NULL, &p, der.len);
    int consumed = pkey != NULL && p == (const unsigned char *)der.buf + der.len;
    PyBuffer_Release(&der);
    if (pkey == NULL || !consumed || !EVP_PKEY_is_a(pkey, "EC")) {
        EVP_PKEY_free(pkey);
        PyErr_SetString(PyExc_ValueError, "not an EC SubjectPublicKeyInfo");
        return NULL;
    }
    char group[32];
    size_t len = 0;
    if (!EVP_PKEY_get_utf8_string_param(pkey, "group", group, sizeof group, &len)
            || strcmp(group, "prime256v1") != 0) {
        EVP_PKEY_free(pkey);
        PyErr_SetString(PyExc_ValueError, "not a P-256 key");
        return NULL;
    }
    KeyObject *key = PyObject_New(KeyObject, &KeyType);
    if (key == NULL) {
        EVP_PKEY_free(pkey);
        return NULL;
    }
    key->signer.pkey = pkey;
#ifndef OPENSSL_NO_DEPRECATED_3_0
    key->signer.ec = EVP_PKEY_get1_EC_KEY(pkey);
    if (key->signer.ec == NULL) {
        Py_DECREF(key);
        PyErr_SetString(PyExc_ValueError, "not an EC key");
        return NULL;
    }
#endif
    return (PyObject *)key;
}

/* One check: r || s over data with SHA-256. 1 valid, 0 not, -1 could not be set up.
 *
 * Through ECDSA_do_verify on the key's EC_KEY (made once per key): the EVP route
 * (EVP_DigestVerifyInit per check) spends ~15 % of a check fetching the algorithm from the
 * provider and another few % DER-encoding r || s only for OpenSSL to decode it again. Both
 * routes end in the same P-256 arithmetic. Where OpenSSL is built without its 3.0
 * deprecated API, the EVP route is used. */
static int
verify(const Signer *key, const unsigned char *data, size_t len, const unsigned char sig[64])
{
    int result = -1;
    ECDSA_SIG *es = ECDSA_SIG_new();
    BIGNUM *r = BN_bin2bn(sig, 32, NULL), *s = BN_bin2bn(sig + 32, 32, NULL);
    if (es == NULL || r == NULL || s == NULL) {
        BN_free(r);
        BN_free(s);
        goto done;
    }
    ECDSA_SIG_set0(es, r, s); /* es owns r and s now */
#ifndef OPENSSL_NO_DEPRECATED_3_0
    unsigned char digest[32];
    unsigned int digest_len = 0;
    if (EVP_Digest(data, len, digest, &digest_len, sha256, NULL) != 1 || digest_len != 32)
        goto done;
    result = ECDSA_do_verify(digest, 32, es, key->ec) == 1;
#else
    unsigned char der[80];
    unsigned char *p = der;
    int der_len = i2d_ECDSA_SIG(es, &p);
    if (der_len <= 0 || der_len > (int)sizeof der)
        goto done;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (ctx != NULL && EVP_DigestVerifyInit(ctx, NULL, sha256, NULL, key->pkey) == 1)
        result = EVP_DigestVerify(ctx, der, (size_t)der_len, data, len) == 1;
    EVP_MD_CTX_free(ctx);
#endif
done:
    ERR_clear_error();
    ECDSA_SIG_free(es);
    return result;
}

/* ------------------------------------------------------------------ Pool */

typedef struct Job {
    struct Job *next;
    long long token;
    Signer signer; /* references of its own */
    int valid;
    size_t len;
    unsigned char sig[64];
    unsigned char data[]; /* len bytes */
} Job;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    pthread_cond_t cv;
    Job *todo, *todo_tail; /* FIFO */
    Job *done;             /* answers not yet taken (any order) */
    Py_ssize_t capacity;
    Py_ssize_t waiting; /* submitted, not yet taken */
    int running;        /* threads alive */
    int wanted;         /* threads asked for */
    int signalled;      /* the eventfd was written since the last take */
    int closed;
    int fd;
} PoolObject;

static void *
worker(void *arg)
{
    PoolObject *pool = arg;
    pthread_mutex_lock(&pool->mu);
    for (;;) {
        while (pool->todo == NULL && pool->running <= pool->wanted)
            pthread_cond_wait(&pool->cv, &pool->mu);
        if (pool->todo == NULL) { /* surplus: end (the queue is empty) */
            pool->running--;
            pthread_cond_broadcast(&pool->cv); /* close() waits for running == 0 */
            pthread_mutex_unlock(&pool->mu);
            OPENSSL_thread_stop(); /* this thread's OpenSSL state */
            return NULL;
        }
        Job *job = pool->todo;
        pool->todo = job->next;
        if (pool->todo == NULL)
            pool->todo_tail = NULL;
        pthread_mutex_unlock(&pool->mu);

        job->valid = verify(&job->signer, job->data, job->len, job->sig);

        pthread_mutex_lock(&pool->mu);
        job->next = pool->done;
        pool->done = job;
        if (!pool->signalled) {
            pool->signalled = 1;
            uint64_t one = 1;
            ssize_t n = write(pool->fd, &one, sizeof one);
            (void)n; /* EAGAIN only when the counter is full: the loop is woken anyway */
        }
    }
}

static void
pool_free_list(Job *job)
{
    while (job != NULL) {
        Job *next = job->next;
        signer_free(&job->signer);
        PyMem_RawFree(job);
        job = next;
    }
}

static int
pool_start(PoolObject *pool, int n)
{
    /* called with the mutex held */
    pool->wanted = n;
    while (pool->running < n) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 256 * 1024);
        int rc = pthread_create(&thread, &attr, worker, pool);
        pthread_attr_destroy(&attr);
        if (rc != 0) {
            pool->wanted = pool->running;
            errno = rc;
            return -1;
        }
        pool->running++;
    }
    pthread_cond_broadcast(&pool->cv); /* surplus threads see running > wanted */
    return 0;
}

static PyObject *
pool_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"capacity", NULL};
    Py_ssize_t capacity;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n", kwlist, &capacity))
        return NULL;
    if (capacity < 1) {
        PyErr_SetString(PyExc_ValueError, "capacity must be at least 1");
        return NULL;
    }
    int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fd < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    PoolObject *pool = (PoolObject *)type->tp_alloc(type, 0);
    if (pool == NULL) {
        close(fd);
        return NULL;
    }
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->cv, NULL);
    pool->capacity = capacity;
    pool->fd = fd;
    return (PyObject *)pool;
}

/* End every thread once the queue is empty and wait for them (without the GIL). */
static void
pool_stop(PoolObject *pool)
{
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&pool->mu);
    pool->closed = 1;
    pool->wanted = 0;
    pthread_cond_broadcast(&pool->cv);
    while (pool->running > 0)
        pthread_cond_wait(&pool->cv, &pool->mu);
    pthread_mutex_unlock(&pool->mu);
    Py_END_ALLOW_THREADS
}

static void
pool_dealloc(PoolObject *pool)
{
    pool_stop(pool); /* the threads hold a pointer to the pool */
    pool_free_list(pool->todo);
    pool_free_list(pool->done);
    if (pool->fd >= 0)
        close(pool->fd);
    pthread_cond_destroy(&pool->cv);
    pthread_mutex_destroy(&pool->mu);
    Py_TYPE(pool)->tp_free((PyObject *)pool);
}

static PyObject *
pool_threads(PoolObject *pool, PyObject *arg)
{
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0 || n > 64) {
        PyErr_SetString(PyExc_ValueError, "threads must be 0 to 64");
        return NULL;
    }
    pthread_mutex_lock(&pool->mu);
    int rc = pool->closed ? 0 : pool_start(pool, (int)n);
    pthread_mutex_unlock(&pool->mu);
    if (rc < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *
pool_submit(PoolObject *pool, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "submit(token, key, data, sig)");
        return NULL;
    }
    long long token = PyLong_AsLongLong(args[0]);
    if (token == -1 && PyErr_Occurred())
        return NULL;
    if (!PyObject_TypeCheck(args[1], &KeyType)) {
        PyErr_SetString(PyExc_TypeError, "key must be a Key");
        return NULL;
    }
    if (!PyBytes_Check(args[2]) || !PyBytes_Check(args[3]) || PyBytes_GET_SIZE(args[3]) != 64) {
        PyErr_SetString(PyExc_TypeError, "data must be bytes, sig 64 bytes");
        return NULL;
    }
    if (pool->closed || pool->wanted == 0 || pool->waiting >= pool->capacity)
        Py_RETURN_FALSE;
    size_t len = (size_t)PyBytes_GET_SIZE(args[2]);
    Job *job = PyMem_RawMalloc(sizeof(Job) + len);
    if (job == NULL)
        return PyErr_NoMemory();
    job->next = NULL;
    job->token = token;
    job->signer = ((KeyObject *)args[1])->signer;
    signer_ref(&job->signer);
    job->valid = -1;
    job->len = len;
    memcpy(job->sig, PyBytes_AS_STRING(args[3]), 64);
    memcpy(job->data, PyBytes_AS_STRING(args[2]), len);
    pthread_mutex_lock(&pool->mu);
    if (pool->todo_tail != NULL)
        pool->todo_tail->next = job;
    else
        pool->todo = job;
    pool->todo_tail = job;
    pool->waiting++;
    pthread_cond_signal(&pool->cv);
    pthread_mutex_unlock(&pool->mu);
    Py_RETURN_TRUE;
}

static PyObject *
pool_take(PoolObject *pool, PyObject *Py_UNUSED(ignored))
{
    uint64_t count;
    ssize_t n = read(pool->fd, &count, sizeof count); /* EAGAIN: nothing written */
    (void)n;
    pthread_mutex_lock(&pool->mu);
    Job *done = pool->done;
    pool->done = NULL;
    pool->signalled = 0;
    pthread_mutex_unlock(&pool->mu);
    Py_ssize_t taken = 0;
    for (Job *job = done; job != NULL; job = job->next)
        taken++;
    pool->waiting -= taken;
    PyObject *out = PyList_New(taken);
    Py_ssize_t i = 0;
    while (done != NULL) {
        Job *job = done;
        done = job->next;
        if (out != NULL) {
            PyObject *item = Py_BuildValue("(Li)", job->token, job->valid);
            if (item == NULL)
                Py_CLEAR(out); /* no memory: these answers are lost, the error says so */
            else
                PyList_SET_ITEM(out, i++, item);
        }
        signer_free(&job->signer);
        PyMem_RawFree(job);
    }
    return out;
}

static PyObject *
pool_close(PoolObject *pool, PyObject *Py_UNUSED(ignored))
{
    pool_stop(pool);
    Py_RETURN_NONE;
}

static PyObject *
pool_get_fd(PoolObject *pool, void *closure)
{
    return PyLong_FromLong(pool->fd);
}

static PyObject *
pool_get_waiting(PoolObject *pool, void *closure)
{
    return PyLong_FromSsize_t(pool->waiting);
}

static PyObject *
pool_get_running(PoolObject *pool, void *closure)
{
    pthread_mutex_lock(&pool->mu);
    int running = pool->running;
    pthread_mutex_unlock(&pool->mu);
    return PyLong_FromLong(running);
}

static PyObject *
pool_get_capacity(PoolObject *pool, void *closure)
{
    return PyLong_FromSsize_t(pool->capacity);
}

static int
pool_set_capacity(PoolObject *pool, PyObject *value, void *closure)
{
    Py_ssize_t n = value == NULL ? -1 : PyLong_AsSsize_t(value);
    if (n == -1 && PyErr_Occurred())
        return -1;
    if (n < 1) {
        PyErr_SetString(PyExc_ValueError, "capacity must be at least 1");
        return -1;
    }
    pool->capacity = n;
    return 0;
}

static PyMethodDef pool_methods[] = {
    {"threads", (PyCFunction)pool_threads, METH_O, "Run n threads (0: none)."},
    {"submit", (PyCFunction)(void (*)(void))pool_submit, METH_FASTCALL,
     "submit(token, key, data, sig) -> bool: queue a check; False when full or no thread."},
    {"take", (PyCFunction)pool_take, METH_NOARGS, "[(token, valid)] of the checks done."},
    {"close", (PyCFunction)pool_close, METH_NOARGS, "End every thread after the queue."},
    {NULL},
};

static PyGetSetDef pool_getset[] = {
    {"fd", (getter)pool_get_fd, NULL, "The eventfd written when answers are ready.", NULL},
    {"waiting", (getter)pool_get_waiting, NULL, "Checks submitted and not yet taken.", NULL},
    {"running", (getter)pool_get_running, NULL, "Threads alive.", NULL},
    {"capacity", (getter)pool_get_capacity, (setter)pool_set_capacity,
     "Checks that may wait at most.", NULL},
    {NULL},
};

static PyTypeObject PoolType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sipguard._es256.Pool",
    .tp_basicsize = sizeof(PoolObject),
    .tp_dealloc = (destructor)pool_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "ES256 checks on threads without the GIL; answers through an eventfd.",
    .tp_methods = pool_methods,
    .tp_getset = pool_getset,
    .tp_new = pool_new,
};

static PyObject *
es256_verify(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    /* verify(key, data, sig) -> 1 / 0 / -1 in this thread (the tests compare it) */
    if (nargs != 3 || !PyObject_TypeCheck(args[0], &KeyType) || !PyBytes_Check(args[1])
            || !PyBytes_Check(args[2]) || PyBytes_GET_SIZE(args[2]) != 64) {
        PyErr_SetString(PyExc_TypeError, "verify(key, data: bytes, sig: 64 bytes)");
        return NULL;
    }
    int valid;
    const Signer *signer = &((KeyObject *)args[0])->signer;
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(args[1]);
    size_t len = (size_t)PyBytes_GET_SIZE(args[1]);
    const unsigned char *sig = (const unsigned char *)PyBytes_AS_STRING(args[2]);
    Py_BEGIN_ALLOW_THREADS
    valid = verify(signer, data, len, sig);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(valid);
}

static PyMethodDef module_methods[] = {
    {"key", (PyCFunction)es256_key, METH_O, "key(der) -> Key: a P-256 SubjectPublicKeyInfo."},
    {"verify", (PyCFunction)(void (*)(void))es256_verify, METH_FASTCALL,
     "verify(key, data, sig) -> 1 valid, 0 not, -1 error: one check in this thread."},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sipguard._es256",
    "ES256 signature checks on threads that never touch the GIL.", -1, module_methods,
};

PyMODINIT_FUNC
PyInit__es256(void)
{
    if (PyType_Ready(&KeyType) < 0 || PyType_Ready(&PoolType) < 0)
        return NULL;
    if (sha256 == NULL && (sha256 = EVP_MD_fetch(NULL, "SHA256", NULL)) == NULL) {
        PyErr_SetString(PyExc_ImportError, "OpenSSL has no SHA256");
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&KeyType);
    Py_INCREF(&PoolType);
    if (PyModule_AddObject(m, "Key", (PyObject *)&KeyType) < 0
            || PyModule_AddObject(m, "Pool", (PyObject *)&PoolType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
