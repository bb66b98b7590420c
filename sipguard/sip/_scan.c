/* The SIP parser's fast path in C: a header block split into lines and indexed by name.
 *
 * One pass over the bytes does what sipguard/sip/parser.py's fast path does with bytes.split,
 * a find and a slice per line, two bytes.count calls and a dict and list per name:
 *
 *     scan(data, start, eol, end, names_cache, max_headers, max_line)
 *         -> (lines, names, index) | None
 *
 * and ``check`` (below) does parser._validate's checks on what it returned; ``start_line``
 * reads the usual request or status line, ``value_text`` a header line's value, and
 * ``line_start`` finds header lines by their first byte in a message not yet parsed (the
 * flood guard's User-Agent check).
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
#include <stdint.h>
#include <string.h>

/* The names memo: a header name's raw spelling -> its canonical name, for the spellings the
 * cache dict passed to scan() knows. A direct-mapped table looked up by the raw bytes, so the
 * usual message makes no bytes object and no dict lookup per header line (~0.1 us each). It
 * holds only what the dict said, and the dict only grows (parser._canonical_name never changes
 * or removes an entry), so an answer from it is the dict's. It follows one dict: another one
 * passed to scan() empties it. */
#define MEMO_SLOTS 256
#define MEMO_KEY 32
typedef struct {
    PyObject *name; /* a strong reference, or NULL: an empty slot */
    Py_ssize_t len;
    char raw[MEMO_KEY];
} Memo;
static Memo memo[MEMO_SLOTS];
static PyObject *memo_owner; /* the dict the memo follows (a strong reference) */

static unsigned int
memo_slot(const char *raw, Py_ssize_t len)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (Py_ssize_t i = 0; i < len; i++)
        h = (h ^ (unsigned char)raw[i]) * 16777619u;
    return h & (MEMO_SLOTS - 1);
}

static void
memo_follow(PyObject *cache)
{
    if (memo_owner == cache)
        return;
    for (int i = 0; i < MEMO_SLOTS; i++)
        Py_CLEAR(memo[i].name);
    Py_INCREF(cache);
    Py_XSETREF(memo_owner, cache);
}

/* The canonical name of raw[:len] (borrowed), NULL when the cache does not know it (no error
 * set) or on an error (set). */
static PyObject *
canonical(PyObject *cache, const char *raw, Py_ssize_t len)
{
    Memo *m = NULL;
    if (len <= MEMO_KEY) {
        m = &memo[memo_slot(raw, len)];
        if (m->name != NULL && m->len == len && memcmp(m->raw, raw, (size_t)len) == 0)
            return m->name;
    }
    PyObject *key = PyBytes_FromStringAndSize(raw, len);
    if (key == NULL)
        return NULL;
    PyObject *name = PyDict_GetItemWithError(cache, key); /* borrowed */
    Py_DECREF(key);
    if (name != NULL && m != NULL) {
        Py_INCREF(name);
        Py_XSETREF(m->name, name);
        m->len = len;
        memcpy(m->raw, raw, (size_t)len);
    }
    return name;
}

/* A limit (a non-negative int of any size): beyond Py_ssize_t it limits nothing. */
static Py_ssize_t
as_limit(PyObject *value)
{
    Py_ssize_t n = PyLong_AsSsize_t(value);
    if (n == -1 && PyErr_Occurred() && PyErr_ExceptionMatches(PyExc_OverflowError)) {
        PyErr_Clear();
        return PyLong_Check(value) && _PyLong_Sign(value) > 0 ? PY_SSIZE_T_MAX : -1;
    }
    return n;
}

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
    memo_follow(cache);
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    Py_ssize_t eol = PyLong_AsSsize_t(args[2]);
    Py_ssize_t end = PyLong_AsSsize_t(args[3]);
    Py_ssize_t max_headers = as_limit(args[5]);
    Py_ssize_t max_line = as_limit(args[6]);
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
        PyObject *name = canonical(cache, line, colon - line); /* borrowed */
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
    /* The lines (bytes), the names (str), the index and its lists (line numbers) hold no
     * object that could be part of a reference cycle, and the message that keeps them never
     * changes them: the cyclic collector need not examine them. A request kept by its
     * transaction would otherwise cost each young pass ~15 objects (~0.75 us each under load). */
    PyObject *key, *numbers;
    Py_ssize_t at = 0;
    while (PyDict_Next(index, &at, &key, &numbers))
        PyObject_GC_UnTrack(numbers);
    PyObject_GC_UnTrack(index);
    PyObject_GC_UnTrack(lines);
    PyObject_GC_UnTrack(names);
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

/* ---------------------------------------------------------------- check */

static int
is_ws(char c)
{
    return c == ' ' || c == '\t';
}

/* The value of a header line (after the first colon) with SP/HT stripped: [*from, *to). */
static void
value_of(PyObject *line, const char **from, const char **to)
{
    const char *p = PyBytes_AS_STRING(line);
    const char *e = p + PyBytes_GET_SIZE(line);
    const char *colon = memchr(p, ':', (size_t)(e - p));
    p = colon == NULL ? e : colon + 1;
    while (p < e && is_ws(*p))
        p++;
    while (e > p && is_ws(e[-1]))
        e--;
    *from = p;
    *to = e;
}

/* Digits only, 1..max of them: their value; -1 otherwise. */
static long long
digits(const char *p, const char *e, Py_ssize_t max)
{
    if (e <= p || e - p > max)
        return -1;
    long long n = 0;
    for (; p < e; p++) {
        if (*p < '0' || *p > '9')
            return -1;
        n = n * 10 + (*p - '0');
    }
    return n;
}

/* The index keys check() looks up, made once (PyDict_GetItemString makes a str per call). */
static PyObject *k_from, *k_to, *k_via, *k_cseq, *k_call_id, *k_max_forwards, *k_content_length;

/* The one line of header ``name`` (borrowed), NULL when it is absent (*many = 0) or repeated
 * (*many = 1). */
static PyObject *
only_line(PyObject *lines, PyObject *index, PyObject *name, int *many)
{
    PyObject *slot = PyDict_GetItem(index, name); /* str keys: no error to report */
    *many = 0;
    if (slot == NULL || !PyList_CheckExact(slot))
        return NULL;
    if (PyList_GET_SIZE(slot) != 1) {
        *many = 1;
        return NULL;
    }
    Py_ssize_t i = PyLong_AsSsize_t(PyList_GET_ITEM(slot, 0));
    if (i < 0 || i >= PyList_GET_SIZE(lines)) {
        PyErr_Clear();
        *many = 1;
        return NULL;
    }
    PyObject *line = PyList_GET_ITEM(lines, i);
    return PyBytes_CheckExact(line) ? line : NULL;
}

static const char TOKEN[] =
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.!%*_+`'~-";

/* check(lines, index, methods, request, datagram, body_length)
 *     -> ((cseq number, cseq method), max-forwards | None, content-length | None, call-id)
 *      | None
 * The checks of parser._validate for the usual message, from the fast path's unfolded lines:
 * From, To, Call-ID and CSeq once each, a Via, Max-Forwards and Content-Length at most once,
 * "CSeq: <1-10 digits> <token>" within range, Max-Forwards (requests) up to 255,
 * Content-Length up to 2**31 with at least that many body bytes, a non-empty Call-ID.
 * Anything else — an error to report, a longer body to cut — returns None and
 * parser._validate, the reference, does the work. */
static PyObject *
check(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6 || !PyList_CheckExact(args[0]) || !PyDict_CheckExact(args[1])
        || !PyDict_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "check(list, dict, dict, bool, bool, int)");
        return NULL;
    }
    PyObject *lines = args[0], *index = args[1], *methods = args[2];
    int request = PyObject_IsTrue(args[3]);
    int datagram = PyObject_IsTrue(args[4]);
    Py_ssize_t body = PyLong_AsSsize_t(args[5]);
    if (request < 0 || datagram < 0 || (body == -1 && PyErr_Occurred()))
        return NULL;
    int many;
    if (only_line(lines, index, k_from, &many) == NULL
        || only_line(lines, index, k_to, &many) == NULL
        || PyDict_GetItem(index, k_via) == NULL)
        Py_RETURN_NONE;
    PyObject *cseq_line = only_line(lines, index, k_cseq, &many);
    PyObject *call_line = only_line(lines, index, k_call_id, &many);
    if (cseq_line == NULL || call_line == NULL)
        Py_RETURN_NONE;
    PyObject *mf_line = only_line(lines, index, k_max_forwards, &many);
    if (many)
        Py_RETURN_NONE;
    PyObject *cl_line = only_line(lines, index, k_content_length, &many);
    if (many || (cl_line == NULL && !datagram))
        Py_RETURN_NONE;

    /* CSeq: the whole value is digits, SP/HT, a token (trailing SP/HT stripped already). */
    const char *p, *e;
    value_of(cseq_line, &p, &e);
    const char *num_end = p;
    while (num_end < e && *num_end >= '0' && *num_end <= '9')
        num_end++;
    long long seq = digits(p, num_end, 10);
    if (seq < 0 || seq > 2147483647LL || num_end == e || !is_ws(*num_end))
        Py_RETURN_NONE;
    const char *m = num_end;
    while (m < e && is_ws(*m))
        m++;
    if (m == e)
        Py_RETURN_NONE;
    const char *m_end = e;
    for (const char *q = m; q < m_end; q++)
        if (*q == '\0' || strchr(TOKEN, *q) == NULL)
            Py_RETURN_NONE;

    long long hops = -1, length = -1;
    if (mf_line != NULL && request) {
        value_of(mf_line, &p, &e);
        hops = digits(p, e, 3);
        if (hops < 0 || hops > 255)
            Py_RETURN_NONE;
    }
    if (cl_line != NULL) {
        value_of(cl_line, &p, &e);
        length = digits(p, e, 10);
        if (length < 0 || length > 2147483648LL || body < length)
            Py_RETURN_NONE;
    }
    value_of(call_line, &p, &e);
    if (p == e || memchr(p, '\r', (size_t)(e - p)) != NULL)
        Py_RETURN_NONE;

    PyObject *call_id = PyUnicode_DecodeUTF8(p, e - p, "surrogateescape");
    if (call_id == NULL)
        return NULL;
    PyObject *method_bytes = PyBytes_FromStringAndSize(m, m_end - m);
    PyObject *method = NULL;
    if (method_bytes != NULL) {
        method = PyDict_GetItemWithError(methods, method_bytes);
        if (method != NULL)
            Py_INCREF(method);
        else if (!PyErr_Occurred())
            method = PyUnicode_DecodeASCII(m, m_end - m, "strict");
        Py_DECREF(method_bytes);
    }
    if (method == NULL) {
        Py_DECREF(call_id);
        return NULL;
    }
    PyObject *result = Py_BuildValue(
        "((LN)NNN)", seq, method,
        hops < 0 ? Py_NewRef(Py_None) : PyLong_FromLongLong(hops),
        length < 0 ? Py_NewRef(Py_None) : PyLong_FromLongLong(length),
        call_id);
    return result;
}

/* ---------------------------------------------------------------- value_text */

/* value_text(line) -> str: message.decode(message.raw_value(line)) — the value of a raw header
 * line after its first colon, folding CRLFs joined to one space with the SP/HT around each
 * removed, stripped of SP/HT, as UTF-8 with undecodable bytes kept as surrogates. */
static PyObject *
value_text(PyObject *self, PyObject *line)
{
    if (!PyBytes_CheckExact(line)) {
        PyErr_SetString(PyExc_TypeError, "value_text(bytes)");
        return NULL;
    }
    const char *p = PyBytes_AS_STRING(line);
    Py_ssize_t n = PyBytes_GET_SIZE(line);
    const char *colon = memchr(p, ':', (size_t)n);
    const char *v = colon == NULL ? p + n : colon + 1;
    const char *e = p + n;
    const char *fold = NULL;
    for (const char *q = v; q + 1 < e; q++) {
        if (q[0] == '\r' && q[1] == '\n') {
            fold = q;
            break;
        }
    }
    if (fold == NULL) {
        while (v < e && is_ws(*v))
            v++;
        while (e > v && is_ws(e[-1]))
            e--;
        return PyUnicode_DecodeUTF8(v, e - v, "surrogateescape");
    }
    /* b" ".join(part.strip(WS) for part in value.split(CRLF)).strip(WS) */
    char *out = PyMem_Malloc((size_t)(e - v) + 1);
    if (out == NULL)
        return PyErr_NoMemory();
    Py_ssize_t len = 0;
    const char *part = v;
    for (;;) {
        const char *cut = NULL;
        for (const char *q = part; q + 1 < e; q++) {
            if (q[0] == '\r' && q[1] == '\n') {
                cut = q;
                break;
            }
        }
        const char *a = part, *b = cut == NULL ? e : cut;
        while (a < b && is_ws(*a))
            a++;
        while (b > a && is_ws(b[-1]))
            b--;
        if (part != v)
            out[len++] = ' ';
        memcpy(out + len, a, (size_t)(b - a));
        len += b - a;
        if (cut == NULL)
            break;
        part = cut + 2;
    }
    Py_ssize_t from = 0;
    while (from < len && is_ws(out[from]))
        from++;
    while (len > from && is_ws(out[len - 1]))
        len--;
    PyObject *text = PyUnicode_DecodeUTF8(out + from, len - from, "surrogateescape");
    PyMem_Free(out);
    return text;
}

/* parser._parse_start_line for the usual line: "SIP/2.0 NNN reason" with an ASCII reason, or
 * "METHOD uri SIP/2.0" with a method of `methods` (bytes -> str) and an ASCII URI without a
 * TAB. Returns (method, uri, status, reason) as the Python code does, or None for anything
 * else (a version written otherwise, an extension method, UTF-8, errors): the Python code. */
static PyObject *
start_line(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyBytes_CheckExact(args[0]) || !PyDict_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "start_line(bytes, dict)");
        return NULL;
    }
    const char *s = PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    for (Py_ssize_t i = 0; i < n; i++)
        if ((unsigned char)s[i] >= 0x80)
            Py_RETURN_NONE;
    if (n >= 11 && memcmp(s, "SIP/2.0 ", 8) == 0) {
        if (s[8] < '1' || s[8] > '6' || s[9] < '0' || s[9] > '9' || s[10] < '0' || s[10] > '9')
            Py_RETURN_NONE;
        if (n > 11 && s[11] != ' ')
            Py_RETURN_NONE;
        long status = (s[8] - '0') * 100 + (s[9] - '0') * 10 + (s[10] - '0');
        Py_ssize_t r = n > 11 ? 12 : n;
        PyObject *reason = PyUnicode_DecodeASCII(s + r, n - r, NULL);
        if (reason == NULL)
            return NULL;
        PyObject *code = PyLong_FromLong(status);
        if (code == NULL) {
            Py_DECREF(reason);
            return NULL;
        }
        PyObject *out = PyTuple_Pack(4, Py_None, Py_None, code, reason);
        Py_DECREF(code);
        Py_DECREF(reason);
        return out;
    }
    const char *sp1 = memchr(s, ' ', (size_t)n);
    if (sp1 == NULL || sp1 == s)
        Py_RETURN_NONE;
    const char *u = sp1 + 1;
    const char *sp2 = memchr(u, ' ', (size_t)(n - (u - s)));
    if (sp2 == NULL || sp2 == u || n - (sp2 + 1 - s) != 7 || memcmp(sp2 + 1, "SIP/2.0", 7) != 0 ||
        memchr(u, '\t', (size_t)(sp2 - u)) != NULL)
        Py_RETURN_NONE;
    PyObject *key = PyBytes_FromStringAndSize(s, sp1 - s);
    if (key == NULL)
        return NULL;
    PyObject *method = PyDict_GetItemWithError(args[1], key); /* borrowed */
    Py_DECREF(key);
    if (method == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    PyObject *uri = PyUnicode_DecodeASCII(u, sp2 - u, NULL);
    if (uri == NULL)
        return NULL;
    PyObject *zero = PyLong_FromLong(0), *empty = PyUnicode_New(0, 0);
    PyObject *out = (zero && empty) ? PyTuple_Pack(4, method, uri, zero, empty) : NULL;
    Py_XDECREF(zero);
    Py_XDECREF(empty);
    Py_DECREF(uri);
    return out;
}

/* line_start(data, letters, pos) -> int: the index of the first LF at or after ``pos`` that
 * is followed by one of ``letters`` (never CR or LF) and lies in the header block, before the
 * first CRLF CRLF of ``data`` (all of it without one): the least of
 * ``data.find(b"\n" + letter, pos, data.find(b"\r\n\r\n"))`` over the letters; -1 if
 * there is none. ``pos`` is 0 or one past an index it returned, so the bytes before it are
 * known to be in the block and the scan starts at ``pos``: linear over all the calls for one
 * message. One memchr per line where the Python code searches the block once per letter. */
static PyObject *
line_start(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyBytes_CheckExact(args[0]) || !PyBytes_CheckExact(args[1]) ||
        !PyLong_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "line_start(bytes, bytes, int)");
        return NULL;
    }
    const char *s = PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    const char *letters = PyBytes_AS_STRING(args[1]);
    Py_ssize_t nl = PyBytes_GET_SIZE(args[1]);
    Py_ssize_t pos = PyLong_AsSsize_t(args[2]);
    if (pos == -1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return NULL;
        PyErr_Clear(); /* beyond any index: nothing to find, or everything from 0 */
        pos = _PyLong_Sign(args[2]) > 0 ? PY_SSIZE_T_MAX : 0;
    }
    Py_ssize_t i = pos < 0 ? 0 : pos;
    while (i < n) {
        const char *p = memchr(s + i, '\n', (size_t)(n - i));
        if (p == NULL)
            break;
        i = p - s;
        if (i + 1 >= n)
            break;
        char c = s[i + 1];
        if (c == '\r' && i >= 1 && s[i - 1] == '\r' && i + 2 < n && s[i + 2] == '\n')
            break; /* CRLF CRLF: the header block ends here */
        if (c != '\r' && c != '\n' && memchr(letters, c, (size_t)nl) != NULL)
            return PyLong_FromSsize_t(i);
        i++;
    }
    return PyLong_FromLong(-1);
}


/* rest_after_first_via(line) -> int: in a raw Via header line (``Via: a, b`` or ``v: a,b``),
 * the index where what follows the first via-parm's comma begins (SP / HT skipped), 0 when the
 * value holds one via-parm, -1 when the line is not the plain shape this handles (a CR or LF:
 * folded; no colon; an unclosed quote or bracket; nothing after the comma) and the Python
 * code (via.after_first_via) must decide. The comma is the first one outside a quoted string
 * (with its backslash escapes) and outside an IPv6 reference's brackets. */
static PyObject *
rest_after_first_via(PyObject *self, PyObject *arg)
{
    if (!PyBytes_CheckExact(arg)) {
        PyErr_SetString(PyExc_TypeError, "rest_after_first_via(bytes)");
        return NULL;
    }
    const char *s = PyBytes_AS_STRING(arg);
    Py_ssize_t n = PyBytes_GET_SIZE(arg);
    const char *colon = memchr(s, ':', (size_t)n);
    if (colon == NULL || memchr(s, '\r', (size_t)n) != NULL || memchr(s, '\n', (size_t)n) != NULL)
        return PyLong_FromLong(-1);
    Py_ssize_t i = colon - s + 1;
    int quoted = 0, bracket = 0;
    for (; i < n; i++) {
        char c = s[i];
        if (quoted) {
            if (c == '\\')
                i++;
            else if (c == '"')
                quoted = 0;
        } else if (c == '"') {
            quoted = 1;
        } else if (c == '[') {
            bracket = 1;
        } else if (c == ']') {
            bracket = 0;
        } else if (c == ',' && !bracket) {
            break;
        }
    }
    if (quoted || bracket)
        return PyLong_FromLong(-1);
    if (i >= n)
        return PyLong_FromLong(0);
    for (i++; i < n && (s[i] == ' ' || s[i] == '\t'); i++)
        ;
    return PyLong_FromSsize_t(i < n ? i : -1);
}

static PyMethodDef methods[] = {
    {"start_line", (PyCFunction)(void (*)(void))start_line, METH_FASTCALL,
     "start_line(line, methods) -> (method, uri, status, reason) | None: "
     "parser._parse_start_line for the usual line, or None for the Python code."},
    {"scan", (PyCFunction)(void (*)(void))scan, METH_FASTCALL,
     "scan(data, start, eol, end, names_cache, max_headers, max_line) -> "
     "(lines, names, index) | None: the header block split and indexed, or None for the "
     "general path."},
    {"check", (PyCFunction)(void (*)(void))check, METH_FASTCALL,
     "check(lines, index, methods, request, datagram, body_length) -> "
     "((cseq, method), max_forwards, content_length, call_id) | None: parser._validate's "
     "checks for the usual message, or None for parser._validate."},
    {"line_start", (PyCFunction)(void (*)(void))line_start, METH_FASTCALL,
     "line_start(data, letters, pos) -> int: the first LF at or after pos in the header "
     "block followed by one of letters, or -1."},
    {"rest_after_first_via", (PyCFunction)rest_after_first_via, METH_O,
     "rest_after_first_via(line) -> int: where the Via values after the first begin in a raw "
     "Via line, 0 with one value, -1 for the Python code."},
    {"value_text", (PyCFunction)value_text, METH_O,
     "value_text(line) -> str: message.decode(message.raw_value(line)) in one pass."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sipguard.sip._scan",
    "The SIP parser's fast path in C (see sipguard/sip/_scan.c).", -1, methods,
};

PyMODINIT_FUNC
PyInit__scan(void)
{
    if ((k_from = PyUnicode_InternFromString("from")) == NULL
        || (k_to = PyUnicode_InternFromString("to")) == NULL
        || (k_via = PyUnicode_InternFromString("via")) == NULL
        || (k_cseq = PyUnicode_InternFromString("cseq")) == NULL
        || (k_call_id = PyUnicode_InternFromString("call-id")) == NULL
        || (k_max_forwards = PyUnicode_InternFromString("max-forwards")) == NULL
        || (k_content_length = PyUnicode_InternFromString("content-length")) == NULL)
        return NULL;
    return PyModule_Create(&module);
}
