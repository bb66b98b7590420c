/* The SIP parser's fast path in C: a header block split into lines and indexed by name.
 *
 * One pass over the bytes does what sipguard/sip/parser.py's fast path does with bytes.split,
 * a find and a slice per line, two bytes.count calls and a dict and list per name:
 *
 *     scan(data, start, eol, end, names_cache, max_headers, max_line)
 *         -> (lines, names, index) | None
 *
 * data[start:eol] is the start line, data[eol + 2:end] the header block (eol < end), and
 * data[end:end + 4] the empty line. It returns the block's lines (bytes, without their CRLF),
 * the canonical name of each (``names_cache[line[:colon]]``) and ``{name: [line numbers]}``,
 * exactly as the Python fast path builds them. It returns None, and the caller takes the
 * general path, for everything that path handles: a bare CR or LF anywhere from ``start`` to
 * the empty line (the general path reports it as a 400), a line without a colon or whose name
 * the cache does not know (folding, a new name, junk), more than ``max_headers`` lines, or a
 * line longer than ``max_line``. It never raises on input; only on memory exhaustion.
 *
 * Built by ``python -m sipguard.native build`` with the mypyc modules; without it the parser
 * runs the same fast path in Python (sipguard/sip/parser.py), and the tests check both agree.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static PyObject *
scan(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "scan() takes 7 arguments");
        return NULL;
    }
    PyObject *data = args[0];
    PyObject *cache = args[4];
    if (!PyBytes_CheckExact(data) || !PyDict_CheckExact(cache)) {
        PyErr_SetString(PyExc_TypeError, "scan(bytes, int, int, int, dict, int, int)");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    Py_ssize_t eol = PyLong_AsSsize_t(args[2]);
    Py_ssize_t end = PyLong_AsSsize_t(args[3]);
    Py_ssize_t max_headers = PyLong_AsSsize_t(args[5]);
    Py_ssize_t max_line = PyLong_AsSsize_t(args[6]);
    if (PyErr_Occurred())
        return NULL;
    const char *buf = PyBytes_AS_STRING(data);
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    if (start < 0 || eol < start || end < eol + 2 || end + 4 > size) {
        PyErr_SetString(PyExc_ValueError, "scan: positions out of range");
        return NULL;
    }
    /* The start line: no CR or LF in it (the CRLF that ends it is at eol). */
    if (memchr(buf + start, '\r', (size_t)(eol - start)) != NULL
        || memchr(buf + start, '\n', (size_t)(eol - start)) != NULL)
        Py_RETURN_NONE;

    PyObject *lines = PyList_New(0);
    PyObject *names = PyList_New(0);
    PyObject *index = PyDict_New();
    if (lines == NULL || names == NULL || index == NULL)
        goto error;

    Py_ssize_t pos = eol + 2;
    Py_ssize_t count = 0;
    while (pos <= end) {
        /* this line runs to the next CR; it must be followed by LF, and hold no LF */
        const char *cr = memchr(buf + pos, '\r', (size_t)(end + 2 - pos));
        Py_ssize_t stop = cr == NULL ? end : (Py_ssize_t)(cr - buf);
        if (stop > end || buf[stop + 1] != '\n')
            goto fallback; /* a bare CR (end is the empty line's CR, always followed by LF) */
        Py_ssize_t len = stop - pos;
        if (len > max_line || ++count > max_headers)
            goto fallback;
        const char *line = buf + pos;
        if (memchr(line, '\n', (size_t)len) != NULL)
            goto fallback; /* a bare LF */
        const char *colon = memchr(line, ':', (size_t)len);
        if (colon == NULL)
            goto fallback;
        PyObject *key = PyBytes_FromStringAndSize(line, colon - line);
        if (key == NULL)
            goto error;
        PyObject *name = PyDict_GetItemWithError(cache, key); /* borrowed */
        Py_DECREF(key);
        if (name == NULL) {
            if (PyErr_Occurred())
                goto error;
            goto fallback;
        }
        PyObject *text = PyBytes_FromStringAndSize(line, len);
        if (text == NULL)
            goto error;
        int failed = PyList_Append(lines, text);
        Py_DECREF(text);
        if (failed || PyList_Append(names, name))
            goto error;
        PyObject *number = PyLong_FromSsize_t(count - 1);
        if (number == NULL)
            goto error;
        PyObject *slot = PyDict_GetItemWithError(index, name); /* borrowed */
        if (slot == NULL) {
            if (PyErr_Occurred()) {
                Py_DECREF(number);
                goto error;
            }
            slot = PyList_New(1);
            if (slot == NULL) {
                Py_DECREF(number);
                goto error;
            }
            PyList_SET_ITEM(slot, 0, number); /* steals number */
            failed = PyDict_SetItem(index, name, slot);
            Py_DECREF(slot);
            if (failed)
                goto error;
        } else {
            failed = PyList_Append(slot, number);
            Py_DECREF(number);
            if (failed)
                goto error;
        }
        pos = stop + 2;
    }
    /* The empty line: its LF was checked with the last header's CRLF above, its CR is at
     * end + 2 (the find that located it saw "\r\n\r\n"). */
    PyObject *result = PyTuple_Pack(3, lines, names, index);
    Py_DECREF(lines);
    Py_DECREF(names);
    Py_DECREF(index);
    return result;

fallback:
    Py_DECREF(lines);
    Py_DECREF(names);
    Py_DECREF(index);
    Py_RETURN_NONE;

error:
    Py_XDECREF(lines);
    Py_XDECREF(names);
    Py_XDECREF(index);
    return NULL;
}

static PyMethodDef methods[] = {
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL,
     "scan(data, start, eol, end, names_cache, max_headers, max_line) -> "
     "(lines, names, index) | None: the header block split and indexed, or None for the "
     "general path."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sipguard.sip._scan",
    "The SIP parser's fast path in C (see sipguard/sip/_scan.c).", -1, methods,
};

PyMODINIT_FUNC
PyInit__scan(void)
{
    return PyModule_Create(&module);
}
