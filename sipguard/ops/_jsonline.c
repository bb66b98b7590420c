/* The fields of a per-call log line as JSON text, in one pass (sipguard/ops/calllog.py).
 *
 *     fields(keys, values, fallback) -> str
 *
 * keys: a tuple of key texts already written as JSON with their separator (', "call_id": ');
 * values: a tuple as long. For each value that is not None, its key text and the value as
 * ``json.dumps`` writes it (ensure_ascii): a str as an ASCII-escaped JSON string, a bool as
 * true / false, an int in decimal, a float as its repr (NaN, Infinity, -Infinity), anything
 * else through ``fallback(value)``, which returns its JSON text. The text of the line's two
 * per-call lines was ~60 % of their cost when each value went through its own Python call
 * and string; built here, one string is made per line part.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

typedef struct {
    char *data;
    size_t len, cap;
    char small[1024];
} Buf;

static int
grow(Buf *b, size_t more)
{
    size_t need = b->len + more;
    if (need <= b->cap)
        return 0;
    size_t cap = b->cap * 2;
    while (cap < need)
        cap *= 2;
    char *data;
    if (b->data == b->small) {
        data = PyMem_Malloc(cap);
        if (data != NULL)
            memcpy(data, b->small, b->len);
    } else {
        data = PyMem_Realloc(b->data, cap);
    }
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->cap = cap;
    return 0;
}

static int
put(Buf *b, const char *s, size_t n)
{
    if (grow(b, n) < 0)
        return -1;
    memcpy(b->data + b->len, s, n);
    b->len += n;
    return 0;
}

/* A str's UTF-8 as it is (key texts, fallback results). */
static int
put_text(Buf *b, PyObject *text)
{
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(text, &n);
    if (s == NULL)
        return -1;
    return put(b, s, (size_t)n);
}

static const char HEX[] = "0123456789abcdef";

static char *
put_u(char *out, Py_UCS4 c)
{
    out[0] = '\\';
    out[1] = 'u';
    out[2] = HEX[(c >> 12) & 0xf];
    out[3] = HEX[(c >> 8) & 0xf];
    out[4] = HEX[(c >> 4) & 0xf];
    out[5] = HEX[c & 0xf];
    return out + 6;
}

/* As json.encoder.encode_basestring_ascii. */
static int
put_string(Buf *b, PyObject *s)
{
    Py_ssize_t n = PyUnicode_GET_LENGTH(s);
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    /* at most 12 bytes per code point (a surrogate pair), and the quotes */
    if (grow(b, (size_t)n * 12 + 2) < 0)
        return -1;
    char *out = b->data + b->len;
    *out++ = '"';
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (c >= ' ' && c <= '~' && c != '\\' && c != '"') {
            *out++ = (char)c;
            continue;
        }
        *out++ = '\\';
        switch (c) {
        case '\\': *out++ = '\\'; break;
        case '"': *out++ = '"'; break;
        case '\b': *out++ = 'b'; break;
        case '\f': *out++ = 'f'; break;
        case '\n': *out++ = 'n'; break;
        case '\r': *out++ = 'r'; break;
        case '\t': *out++ = 't'; break;
        default:
            out--; /* put_u writes the backslash */
            if (c >= 0x10000) {
                Py_UCS4 v = c - 0x10000;
                out = put_u(out, 0xd800 | ((v >> 10) & 0x3ff));
                out = put_u(out, 0xdc00 | (v & 0x3ff));
            } else {
                out = put_u(out, c);
            }
        }
    }
    *out++ = '"';
    b->len = (size_t)(out - b->data);
    return 0;
}

static int
put_float(Buf *b, double x)
{
    if (x != x)
        return put(b, "NaN", 3);
    if (x == Py_HUGE_VAL)
        return put(b, "Infinity", 8);
    if (x == -Py_HUGE_VAL)
        return put(b, "-Infinity", 9);
    char *text = PyOS_double_to_string(x, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (text == NULL)
        return -1;
    int rc = put(b, text, strlen(text));
    PyMem_Free(text);
    return rc;
}

static int
put_value(Buf *b, PyObject *v, PyObject *fallback)
{
    if (PyUnicode_Check(v))
        return put_string(b, v);
    if (v == Py_True)
        return put(b, "true", 4);
    if (v == Py_False)
        return put(b, "false", 5);
    if (PyLong_CheckExact(v)) {
        int overflow;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (!overflow) {
            if (x == -1 && PyErr_Occurred())
                return -1;
            char text[24];
            int n = snprintf(text, sizeof text, "%lld", x);
            return put(b, text, (size_t)n);
        }
    }
    if (PyFloat_CheckExact(v))
        return put_float(b, PyFloat_AS_DOUBLE(v));
    PyObject *text = PyObject_CallOneArg(fallback, v);
    if (text == NULL)
        return -1;
    if (!PyUnicode_Check(text)) {
        Py_DECREF(text);
        PyErr_SetString(PyExc_TypeError, "fallback must return a str");
        return -1;
    }
    int rc = put_text(b, text);
    Py_DECREF(text);
    return rc;
}

static PyObject *
fields(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 3 || !PyTuple_Check(args[0]) || !PyTuple_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "fields(keys: tuple, values: tuple, fallback)");
        return NULL;
    }
    PyObject *keys = args[0], *values = args[1], *fallback = args[2];
    Py_ssize_t n = PyTuple_GET_SIZE(keys);
    if (PyTuple_GET_SIZE(values) != n) {
        PyErr_SetString(PyExc_ValueError, "keys and values differ in length");
        return NULL;
    }
    Buf b;
    b.data = b.small;
    b.len = 0;
    b.cap = sizeof b.small;
    PyObject *result = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyTuple_GET_ITEM(values, i);
        if (v == Py_None)
            continue;
        PyObject *k = PyTuple_GET_ITEM(keys, i);
        if (!PyUnicode_Check(k)) {
            PyErr_SetString(PyExc_TypeError, "a key text must be a str");
            goto done;
        }
        if (put_text(&b, k) < 0 || put_value(&b, v, fallback) < 0)
            goto done;
    }
    result = PyUnicode_DecodeUTF8(b.data, (Py_ssize_t)b.len, "strict");
done:
    if (b.data != b.small)
        PyMem_Free(b.data);
    return result;
}

static PyMethodDef methods[] = {
    {"fields", (PyCFunction)(void (*)(void))fields, METH_FASTCALL,
     "fields(keys, values, fallback) -> str: the JSON text of the fields not None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sipguard.ops._jsonline",
    "The fields of a per-call log line as JSON text.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__jsonline(void)
{
    return PyModule_Create(&module);
}
