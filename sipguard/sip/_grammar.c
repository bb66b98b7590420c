/* The header grammars' fast path in C: the usual SIP URI, name-addr and via-parm.
 *
 * Every From, To, Contact, Route and Via a message brings is parsed by the grammar modules
 * (sipguard/sip/uri.py, nameaddr.py, via.py); under load that is about a fifth of the proxy's
 * time, spread over regex matches, slices and small objects. These functions parse the shapes
 * real traffic has, in one pass each, and build the very objects the Python code builds:
 *
 *     sip_uri(text)              -> Uri | None            (uri._parse_uri)
 *     scan_name_addr(text, pos)  -> (NameAddr, end, bracketed) | None   (nameaddr.scan_name_addr)
 *     scan_via(text, pos)        -> (Via, end) | None     (via._scan_via, its fast shape)
 *     register(name, object)     -> None   (the classes, and uri.check_host, before first use)
 *     untrack(obj)               -> None   (out of the cyclic collector's view; see untrack())
 *
 * Each returns None for anything outside its subset, and the caller takes its Python path,
 * which is the reference: it parses the rest of the grammar and reports every error. The
 * subset is a strict part of what the Python fast paths accept (their regexes are quoted
 * below), so a value the C code accepts gives the same object there. Declined:
 * non-ASCII text; a URI with a password, headers (``?``), ``%`` escapes (user or parameters),
 * a port above 65535, a user whose number needs more than the two fast exits of
 * ``uri._number``; a display name with a quoted-pair; parameters with whitespace or quoted
 * values; Via parameters received, maddr or ttl (checked in Python), and any error. The host
 * goes through ``uri.check_host`` (it raises SipParseError for a malformed one, as the Python
 * path would at the same point). Never raises otherwise, except on memory exhaustion.
 *
 * Built by ``python -m sipguard.native build``; without it the Python paths run alone, and
 * tests/unit/test_grammar_fast.py checks that both give the same objects or the same error.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static PyObject *Uri_type, *NameAddr_type, *Via_type, *check_host_fn;

/* The cyclic collector examines every container object that outlives a young pass once
 * (~0.75 us each under load, cold memory; sipguard/ops/collector.py). A Uri, a NameAddr and a
 * Via hold only text, numbers, None, tuples of those and (a NameAddr) a Uri: values that can
 * be in no reference cycle, made by the thousand per second and kept by the memo caches and a
 * call's transactions. Untracked here, where they are made, the collector never sees them;
 * reference counting frees them as before. Only for objects that can reach no container that
 * could reach back to them (the C untrack is a no-op for an untracked or non-GC object). */
static void
untrack(PyObject *obj)
{
    if (obj != NULL && PyObject_IS_GC(obj) && PyObject_GC_IsTracked(obj))
        PyObject_GC_UnTrack(obj);
}
static PyObject *str_sip, *str_sips, *str_sip20, *str_user;

/* Character classes (ASCII; a byte >= 0x80 never occurs: the text is checked to be ASCII). */
enum {
    C_USER = 1,    /* [!#-9;=?A-Z_a-z~] minus "%" (uri._SIP_FAST user, unescaped only) */
    C_HOST = 2,    /* [A-Za-z0-9_.\-] */
    C_V6 = 4,      /* [0-9A-Fa-f:.] */
    C_PARAM = 8,   /* [A-Za-z0-9\-_.!~*'()\[\]/:&+$] (uri._PARAMCHAR minus "%") */
    C_TOKEN = 16,  /* [A-Za-z0-9\-.!%*_+`'~] (params.TOKEN_CHARS) */
    C_VALUE = 32,  /* TOKEN + "[]:" (params.VALUE_CHARS) */
};
static unsigned char cls[256];

static void
init_classes(void)
{
    for (int c = 0; c < 128; c++) {
        int alnum = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
        unsigned char k = 0;
        if ((c == '!' || (c >= '#' && c <= '9') || c == ';' || c == '=' || c == '?' ||
             (c >= 'A' && c <= 'Z') || c == '_' || (c >= 'a' && c <= 'z') || c == '~') &&
            c != '%')
            k |= C_USER;
        if (alnum || c == '_' || c == '.' || c == '-')
            k |= C_HOST;
        if ((c >= '0' && c <= '9') || (c >= 'A' && c <= 'F') || (c >= 'a' && c <= 'f') ||
            c == ':' || c == '.')
            k |= C_V6;
        if (alnum || (c && strchr("-_.!~*'()[]/:&+$", c)))
            k |= C_PARAM;
        if (alnum || (c && strchr("-.!%*_+`'~", c)))
            k |= C_TOKEN | C_VALUE;
        if (c == '[' || c == ']' || c == ':')
            k |= C_VALUE;
        cls[c] = k;
    }
}

#define IS(c, k) (cls[(unsigned char)(c)] & (k))
#define DECLINE ((PyObject *)1) /* internal: not handled here (NULL is an exception) */

static PyObject *
lower_ascii(const char *s, Py_ssize_t n)
{
    PyObject *out = PyUnicode_New(n, 127);
    if (out == NULL)
        return NULL;
    char *d = (char *)PyUnicode_1BYTE_DATA(out);
    for (Py_ssize_t i = 0; i < n; i++) {
        char c = s[i];
        d[i] = (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c;
    }
    return out;
}

static PyObject *
upper_ascii(const char *s, Py_ssize_t n)
{
    PyObject *out = PyUnicode_New(n, 127);
    if (out == NULL)
        return NULL;
    char *d = (char *)PyUnicode_1BYTE_DATA(out);
    for (Py_ssize_t i = 0; i < n; i++) {
        char c = s[i];
        d[i] = (c >= 'a' && c <= 'z') ? (char)(c - 32) : c;
    }
    return out;
}

/* *( ";" name [ "=" value ] ) from s[*pos], no whitespace and no quotes: name chars `name`,
 * value chars `value`, names lower-cased. Returns the params tuple (new ref) and moves *pos to
 * the end, DECLINE for an empty name or value, NULL on error. */
static PyObject *
plain_params(const char *s, Py_ssize_t n, Py_ssize_t *pos, int name, int value)
{
    Py_ssize_t j = *pos;
    if (j >= n || s[j] != ';')
        return PyTuple_New(0);
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    while (j < n && s[j] == ';') {
        Py_ssize_t a = j + 1, k = a;
        while (k < n && IS(s[k], name))
            k++;
        if (k == a)
            goto decline;
        Py_ssize_t b = k;
        PyObject *val = Py_None;
        Py_INCREF(val);
        if (k < n && s[k] == '=') {
            Py_ssize_t v = k + 1;
            k = v;
            while (k < n && IS(s[k], value))
                k++;
            Py_DECREF(val);
            if (k == v)
                goto decline;
            val = PyUnicode_FromStringAndSize(s + v, k - v);
            if (val == NULL)
                goto fail;
        }
        PyObject *key = lower_ascii(s + a, b - a);
        if (key == NULL) {
            Py_DECREF(val);
            goto fail;
        }
        PyObject *pair = PyTuple_Pack(2, key, val);
        Py_DECREF(key);
        Py_DECREF(val);
        if (pair == NULL || PyList_Append(list, pair) < 0) {
            Py_XDECREF(pair);
            goto fail;
        }
        PyObject_GC_UnTrack(pair); /* see below */
        Py_DECREF(pair);
        j = k;
    }
    *pos = j;
    PyObject *out = PyList_AsTuple(list);
    Py_DECREF(list);
    /* Tuples of str and None, and a tuple of those, can be in no reference cycle: the cyclic
     * collector need not examine them. CPython untracks such tuples itself, but only once a
     * collection has examined them; a URI's and a Via's parameters live as long as their call,
     * so each would be examined once (~0.75 us under load, ~12 tuples per call). */
    if (out != NULL)
        PyObject_GC_UnTrack(out);
    return out;
decline:
    Py_DECREF(list);
    return DECLINE;
fail:
    Py_DECREF(list);
    return NULL;
}

/* hostport = ( [A-Za-z0-9_.\-]+ / "[" [0-9A-Fa-f:.]+ "]" ) [ ":" 1*5DIGIT ], from s[*j]: the
 * host ends at *host_end, *port is -1 when absent, *j moves past it all. -1: not that shape, or
 * a port above 65535 (the Python code reports it). */
static int
host_port(const char *s, Py_ssize_t n, Py_ssize_t *pos, Py_ssize_t *host_end, long *port)
{
    Py_ssize_t hp = *pos, j = hp;
    if (j < n && s[j] == '[') {
        j++;
        while (j < n && IS(s[j], C_V6))
            j++;
        if (j == hp + 1 || j >= n || s[j] != ']')
            return -1;
        j++;
    }
    else {
        while (j < n && IS(s[j], C_HOST))
            j++;
        if (j == hp)
            return -1;
    }
    *host_end = j;
    *port = -1;
    if (j < n && s[j] == ':') {
        Py_ssize_t d = ++j;
        long value = 0;
        while (j < n && s[j] >= '0' && s[j] <= '9' && j - d < 6)
            value = value * 10 + (s[j++] - '0');
        if (j == d || j - d > 5 || value > 65535)
            return -1;
        *port = value;
    }
    *pos = j;
    return 0;
}

/* The value of the first parameter `name` in params (borrowed; Py_None when valueless), or
 * NULL when absent. */
static PyObject *
get_param(PyObject *params, PyObject *name)
{
    Py_ssize_t count = PyTuple_GET_SIZE(params);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *pair = PyTuple_GET_ITEM(params, i);
        if (PyUnicode_Compare(PyTuple_GET_ITEM(pair, 0), name) == 0)
            return PyTuple_GET_ITEM(pair, 1);
    }
    return NULL;
}

/* uri._SIP_FAST and uri._sip_from_match on text[a:b]:
 *
 *     ((?i:sips?)):(?:([!#-9;=?A-Z_a-z~]++)(?::([!#-;=?A-Z_a-z~]*+))?+@)?+
 *     ([A-Za-z0-9_.\-]++|\[[0-9A-Fa-f:.]++\])(?::([0-9]{1,5}+))?+
 *     ((?:;P++(?:=P++)?+)*+)(?:\?(...)*+)?+           fullmatch; P = uri._PARAMCHAR
 *
 * without password, headers or "%". Returns a new Uri, DECLINE, or NULL on error. */
static PyObject *
uri_fast(PyObject *text, const char *base, Py_ssize_t a, Py_ssize_t b)
{
    const char *s = base + a;
    Py_ssize_t n = b - a, p;
    if (Uri_type == NULL || check_host_fn == NULL || n < 5)
        return DECLINE;
    if (!((s[0] | 32) == 's' && (s[1] | 32) == 'i' && (s[2] | 32) == 'p'))
        return DECLINE;
    PyObject *scheme;
    if (s[3] == ':') {
        scheme = str_sip;
        p = 4;
    }
    else if ((s[3] | 32) == 's' && s[4] == ':') {
        scheme = str_sips;
        p = 5;
    }
    else
        return DECLINE;
    Py_ssize_t user_a = -1, user_b = -1, hp = p;
    const char *at = memchr(s + p, '@', (size_t)(n - p));
    if (at != NULL) {
        Py_ssize_t e = at - s;
        if (e == p)
            return DECLINE;
        for (Py_ssize_t i = p; i < e; i++)
            if (!IS(s[i], C_USER))
                return DECLINE; /* a password (":"), "%", or what the regex refuses */
        user_a = p;
        user_b = e;
        hp = e + 1;
    }
    Py_ssize_t j = hp, host_b;
    long port;
    if (host_port(s, n, &j, &host_b, &port) < 0)
        return DECLINE;
    PyObject *params = plain_params(s, n, &j, C_PARAM, C_PARAM);
    if (params == NULL || params == DECLINE)
        return params;
    if (j != n) { /* headers, "%" in a parameter, or anything the regex does not take */
        Py_DECREF(params);
        return DECLINE;
    }
    PyObject *user = NULL, *number = Py_None;
    if (user_a >= 0) {
        /* uri._number's two fast exits: "+"? digits is the number; a user that cannot start
         * a number has none (unless user=phone: then the general code decides). */
        const char *u = s + user_a;
        Py_ssize_t un = user_b - user_a;
        int phone = 0;
        PyObject *value = get_param(params, str_user);
        if (value != NULL && value != Py_None) {
            Py_ssize_t vn = PyUnicode_GET_LENGTH(value);
            const char *v = (const char *)PyUnicode_1BYTE_DATA(value);
            phone = vn == 5 && (v[0] | 32) == 'p' && (v[1] | 32) == 'h' && (v[2] | 32) == 'o' &&
                    (v[3] | 32) == 'n' && (v[4] | 32) == 'e';
        }
        int digits_only = 0;
        if (u[0] == '+' || (u[0] >= '0' && u[0] <= '9') || strchr("-.() ", u[0]) != NULL) {
            Py_ssize_t i = u[0] == '+' ? 1 : 0;
            digits_only = i < un;
            for (; i < un; i++)
                if (u[i] < '0' || u[i] > '9')
                    digits_only = 0;
            if (!digits_only || un > 32) { /* (uri.MAX_NUMBER_DIGITS: the Python path decides) */
                Py_DECREF(params);
                return DECLINE;
            }
        }
        else if (phone) {
            Py_DECREF(params);
            return DECLINE;
        }
        user = PyUnicode_FromStringAndSize(u, un);
        if (user == NULL) {
            Py_DECREF(params);
            return NULL;
        }
        if (digits_only)
            number = user;
    }
    PyObject *host_text = PyUnicode_FromStringAndSize(s + hp, host_b - hp);
    PyObject *host = NULL, *port_obj = NULL, *raw = NULL, *result = NULL;
    if (host_text == NULL)
        goto done;
    host = PyObject_CallOneArg(check_host_fn, host_text); /* raises for a malformed host */
    if (host == NULL)
        goto done;
    if (port >= 0) {
        port_obj = PyLong_FromLong(port);
        if (port_obj == NULL)
            goto done;
    }
    raw = (a == 0 && b == PyUnicode_GET_LENGTH(text)) ? Py_NewRef(text)
                                                      : PyUnicode_Substring(text, a, b);
    if (raw == NULL)
        goto done;
    PyObject *args[9] = {scheme, user ? user : Py_None, Py_None, host,
                         port_obj ? port_obj : Py_None, params, Py_None, raw, number};
    result = PyObject_Vectorcall(Uri_type, args, 9, NULL);
    untrack(result);
done:
    Py_XDECREF(user);
    Py_XDECREF(host_text);
    Py_XDECREF(host);
    Py_XDECREF(port_obj);
    Py_XDECREF(raw);
    Py_DECREF(params);
    return result;
}

static PyObject *
finish(PyObject *r)
{
    if (r == DECLINE)
        Py_RETURN_NONE;
    return r;
}

static const char *
ascii_text(PyObject *text, Py_ssize_t *n)
{
    if (!PyUnicode_Check(text) || !PyUnicode_IS_ASCII(text))
        return NULL;
    *n = PyUnicode_GET_LENGTH(text);
    return (const char *)PyUnicode_1BYTE_DATA(text);
}

/* The (text, pos) arguments of a scan: 1 with the text's ASCII bytes, its length and a pos
 * within it; 0 when it is not for the C code (a non-ASCII text, a pos outside it); -1 with an
 * exception set (wrong arguments). */
static int
text_at(PyObject *const *args, Py_ssize_t nargs, const char *signature, const char **s,
        Py_ssize_t *n, Py_ssize_t *pos)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "%s", signature);
        return -1;
    }
    *pos = PyLong_AsSsize_t(args[1]);
    if (*pos == -1 && PyErr_Occurred())
        return -1;
    *s = ascii_text(args[0], n);
    return *s != NULL && *pos >= 0 && *pos <= *n;
}

static PyObject *
sip_uri(PyObject *self, PyObject *text)
{
    Py_ssize_t n;
    const char *s = ascii_text(text, &n);
    if (s == NULL)
        Py_RETURN_NONE;
    return finish(uri_fast(text, s, 0, n));
}

/* nameaddr.scan_name_addr: [ display-name ] "<" URI ">" or a bare URI, then header params.
 * display-name = quoted-string (no quoted-pair here) / *(token LWS), as
 *     _DISPLAY_TOKENS = ([TOKEN]++(?:[ \t]++[TOKEN]++)*+)[ \t]*+<
 * a bare URI runs to the first ";", ",", SP or HT. Parameters: params.scan_params' plain
 * case; whitespace before a ";" or "=" after them goes to the Python path. */
static PyObject *
scan_name_addr(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    const char *s;
    Py_ssize_t n, pos;
    int at = text_at(args, nargs, "scan_name_addr(text, pos)", &s, &n, &pos);
    if (at < 0)
        return NULL;
    PyObject *text = args[0];
    if (at == 0 || NameAddr_type == NULL)
        Py_RETURN_NONE;
    while (pos < n && (s[pos] == ' ' || s[pos] == '\t'))
        pos++;
    if (pos >= n)
        Py_RETURN_NONE;
    Py_ssize_t start = pos, p = -1, disp_a = -1, disp_b = -1;
    if (s[pos] == '"') {
        Py_ssize_t q = pos + 1;
        while (q < n && s[q] != '"') {
            unsigned char c = (unsigned char)s[q];
            if (c == '\\' || c == 0x7f || (c < 0x20 && c != '\t'))
                Py_RETURN_NONE;
            q++;
        }
        if (q >= n)
            Py_RETURN_NONE;
        disp_a = pos + 1;
        disp_b = q;
        q++;
        while (q < n && (s[q] == ' ' || s[q] == '\t'))
            q++;
        if (q >= n || s[q] != '<')
            Py_RETURN_NONE;
        p = q;
    }
    else if (s[pos] == '<') {
        p = pos;
    }
    else if (IS(s[pos], C_TOKEN)) {
        Py_ssize_t j = pos;
        while (j < n && IS(s[j], C_TOKEN))
            j++;
        for (;;) {
            Py_ssize_t k = j;
            while (k < n && (s[k] == ' ' || s[k] == '\t'))
                k++;
            if (k == j || k >= n || !IS(s[k], C_TOKEN))
                break;
            j = k;
            while (j < n && IS(s[j], C_TOKEN))
                j++;
        }
        Py_ssize_t k = j;
        while (k < n && (s[k] == ' ' || s[k] == '\t'))
            k++;
        if (k < n && s[k] == '<') {
            disp_a = pos;
            disp_b = j;
            p = k;
        }
    }
    PyObject *uri;
    Py_ssize_t j;
    int bracketed = p >= 0;
    if (bracketed) {
        const char *close = memchr(s + p + 1, '>', (size_t)(n - p - 1));
        if (close == NULL)
            Py_RETURN_NONE;
        j = close - s;
        uri = uri_fast(text, s, p + 1, j);
        j++;
    }
    else {
        j = pos;
        while (j < n && s[j] != ';' && s[j] != ',' && s[j] != ' ' && s[j] != '\t') {
            if (s[j] == '?')
                Py_RETURN_NONE;
            j++;
        }
        if (j == pos)
            Py_RETURN_NONE;
        uri = uri_fast(text, s, pos, j);
    }
    if (uri == NULL || uri == DECLINE)
        return finish(uri);
    PyObject *params = plain_params(s, n, &j, C_TOKEN, C_VALUE);
    if (params == NULL || params == DECLINE) {
        Py_DECREF(uri);
        return finish(params);
    }
    /* What the Python scan would still take as a parameter: whitespace, then ";" (or "=" after
     * a valueless name). */
    Py_ssize_t k = j;
    while (k < n && (s[k] == ' ' || s[k] == '\t'))
        k++;
    if (k < n && (s[k] == ';' || s[k] == '=')) {
        Py_DECREF(uri);
        Py_DECREF(params);
        Py_RETURN_NONE;
    }
    PyObject *display = Py_None, *raw = NULL, *na = NULL, *end = NULL, *out = NULL;
    Py_INCREF(display);
    if (disp_a >= 0) {
        Py_DECREF(display);
        display = PyUnicode_Substring(text, disp_a, disp_b);
        if (display == NULL)
            goto done;
    }
    raw = PyUnicode_Substring(text, start, j);
    if (raw == NULL)
        goto done;
    PyObject *argv[4] = {display, uri, params, raw};
    na = PyObject_Vectorcall(NameAddr_type, argv, 4, NULL);
    if (na == NULL)
        goto done;
    untrack(na);
    end = PyLong_FromSsize_t(j);
    if (end == NULL)
        goto done;
    out = PyTuple_Pack(3, na, end, bracketed ? Py_True : Py_False);
done:
    Py_XDECREF(display);
    Py_XDECREF(raw);
    Py_XDECREF(na);
    Py_XDECREF(end);
    Py_DECREF(uri);
    Py_DECREF(params);
    return out;
}

/* via._VIA_FAST and the checks of via._scan_via / _check_params:
 *
 *     SIP/2\.0/(T++) ([A-Za-z0-9_.\-]++|\[[0-9A-Fa-f:.]++\])(?::([0-9]{1,5}+))?+
 *     ((?:;T++(?:=V++)?+)*+)(?=[ \t]*+(?:,|\Z))          T = token, V = token + "[]:"
 *
 * A branch needs a value, an rport value is a port; received, maddr and ttl go to Python. */
static PyObject *
scan_via(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    const char *s;
    Py_ssize_t n, pos;
    int at = text_at(args, nargs, "scan_via(text, pos)", &s, &n, &pos);
    if (at < 0)
        return NULL;
    PyObject *text = args[0];
    if (at == 0 || Via_type == NULL || check_host_fn == NULL || n - pos < 10 ||
        memcmp(s + pos, "SIP/2.0/", 8) != 0)
        Py_RETURN_NONE;
    Py_ssize_t t = pos + 8, j = t;
    while (j < n && IS(s[j], C_TOKEN))
        j++;
    if (j == t || j >= n || s[j] != ' ')
        Py_RETURN_NONE;
    Py_ssize_t t_end = j, hp = ++j, host_b;
    long port;
    if (host_port(s, n, &j, &host_b, &port) < 0)
        Py_RETURN_NONE;
    PyObject *params = plain_params(s, n, &j, C_TOKEN, C_VALUE);
    if (params == NULL || params == DECLINE)
        return finish(params);
    Py_ssize_t k = j;
    while (k < n && (s[k] == ' ' || s[k] == '\t'))
        k++;
    if (k < n && s[k] != ',') {
        Py_DECREF(params);
        Py_RETURN_NONE;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(params);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *pair = PyTuple_GET_ITEM(params, i);
        const char *key = (const char *)PyUnicode_1BYTE_DATA(PyTuple_GET_ITEM(pair, 0));
        PyObject *value = PyTuple_GET_ITEM(pair, 1);
        int ok = 1;
        if (!strcmp(key, "received") || !strcmp(key, "maddr") || !strcmp(key, "ttl"))
            ok = 0;
        else if (!strcmp(key, "branch"))
            ok = value != Py_None;
        else if (!strcmp(key, "rport") && value != Py_None) {
            Py_ssize_t vn = PyUnicode_GET_LENGTH(value);
            const char *v = (const char *)PyUnicode_1BYTE_DATA(value);
            long r = 0;
            ok = vn > 0 && vn <= 5;
            for (Py_ssize_t m = 0; ok && m < vn; m++) {
                ok = v[m] >= '0' && v[m] <= '9';
                r = r * 10 + (v[m] - '0');
            }
            ok = ok && r <= 65535;
        }
        if (!ok) {
            Py_DECREF(params);
            Py_RETURN_NONE;
        }
    }
    PyObject *transport = NULL, *host_text = NULL, *host = NULL, *port_obj = NULL;
    PyObject *raw = NULL, *via = NULL, *end = NULL, *out = NULL;
    transport = upper_ascii(s + t, t_end - t);
    if (transport == NULL)
        goto done;
    host_text = PyUnicode_FromStringAndSize(s + hp, host_b - hp);
    if (host_text == NULL)
        goto done;
    host = PyObject_CallOneArg(check_host_fn, host_text);
    if (host == NULL)
        goto done;
    if (port >= 0 && (port_obj = PyLong_FromLong(port)) == NULL)
        goto done;
    raw = PyUnicode_Substring(text, pos, j);
    if (raw == NULL)
        goto done;
    PyObject *argv[6] = {str_sip20, transport, host, port_obj ? port_obj : Py_None, params,
                         raw};
    via = PyObject_Vectorcall(Via_type, argv, 6, NULL);
    if (via == NULL)
        goto done;
    untrack(via);
    end = PyLong_FromSsize_t(j);
    if (end == NULL)
        goto done;
    out = PyTuple_Pack(2, via, end);
done:
    Py_XDECREF(transport);
    Py_XDECREF(host_text);
    Py_XDECREF(host);
    Py_XDECREF(port_obj);
    Py_XDECREF(raw);
    Py_XDECREF(via);
    Py_XDECREF(end);
    Py_DECREF(params);
    return out;
}

static PyObject *
untracked(PyObject *self, PyObject *obj)
{
    untrack(obj);
    Py_RETURN_NONE;
}

static PyObject *
register_(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyUnicode_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "register(name, object)");
        return NULL;
    }
    const char *name = PyUnicode_AsUTF8(args[0]);
    if (name == NULL)
        return NULL;
    PyObject **slot = !strcmp(name, "Uri")          ? &Uri_type
                      : !strcmp(name, "NameAddr")   ? &NameAddr_type
                      : !strcmp(name, "Via")        ? &Via_type
                      : !strcmp(name, "check_host") ? &check_host_fn
                                                    : NULL;
    if (slot == NULL) {
        PyErr_Format(PyExc_ValueError, "register: unknown name %R", args[0]);
        return NULL;
    }
    Py_XSETREF(*slot, Py_NewRef(args[1]));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"sip_uri", (PyCFunction)sip_uri, METH_O, "The usual SIP URI as a Uri; None: not handled."},
    {"scan_name_addr", (PyCFunction)(void (*)(void))scan_name_addr, METH_FASTCALL,
     "(NameAddr, end, bracketed) for the usual name-addr at pos; None: not handled."},
    {"scan_via", (PyCFunction)(void (*)(void))scan_via, METH_FASTCALL,
     "(Via, end) for the usual via-parm at pos; None: not handled."},
    {"untrack", (PyCFunction)untracked, METH_O,
     "Take an object that can be in no reference cycle out of the collector's view."},
    {"register", (PyCFunction)(void (*)(void))register_, METH_FASTCALL,
     "Give the classes (Uri, NameAddr, Via) and uri.check_host to build with."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sipguard.sip._grammar",
    "The header grammars' fast path in C (see sipguard/sip/_grammar.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__grammar(void)
{
    init_classes();
    str_sip = PyUnicode_InternFromString("sip");
    str_sips = PyUnicode_InternFromString("sips");
    str_sip20 = PyUnicode_InternFromString("SIP/2.0");
    str_user = PyUnicode_InternFromString("user");
    if (!str_sip || !str_sips || !str_sip20 || !str_user)
        return NULL;
    return PyModule_Create(&module);
}
