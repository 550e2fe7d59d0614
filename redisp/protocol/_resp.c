/* redisp.protocol._resp: the RESP door's two fast parsers and its GET reply writer, compiled.
 *
 * only_gets(data, gets_known) and parse_split(buf, max_count, max_size) give
 * exactly what redisp.resp's pure-Python reference functions of the same
 * names give (tests/test_resp_c.py checks it on random input, every
 * chunking, small limits).  The Python versions split the packet at every
 * CRLF and check the tokens with list operations; here the packet is walked
 * once, the only objects made being the keys/arguments and their lists (see
 * bench/NOTES-perf.md, "w-chot").
 *
 * The rules, as the Python reference has them through bytes.split(b"\r\n"):
 * a token ends at the first CRLF at or after its start; a header is "$"
 * then the canonical decimal length ("0", or digits without a leading
 * zero) of the token after it; a count is "*" then a canonical 1..9999.
 * Anything else stops the walk where the request began.
 *
 * bulks(values, limit) writes the replies of pipelined GETs (each value a
 * bulk string) into one bytes object, or declines with None, leaving the
 * case to redisp.replies.get_replies, whose result it equals.
 *
 * Only exact bytes are read (their buffer cannot change or run Python code
 * while it is read), and the limits come in as arguments, so this module
 * holds no state.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

/* The first q in [start, end - 1) with s[q] == '\r' and s[q + 1] == '\n'
 * (the next CRLF, as bytes.split finds it), or -1. */
static Py_ssize_t
find_crlf(const char *s, Py_ssize_t start, Py_ssize_t end)
{
    while (start + 1 < end) {
        const char *p = memchr(s + start, '\r', (size_t)(end - 1 - start));
        if (p == NULL)
            return -1;
        Py_ssize_t q = p - s;
        if (s[q + 1] == '\n')
            return q;
        start = q + 1;
    }
    return -1;
}

/* The canonical decimal s[start:end] ("0", or 1-9 then digits), or -1 when
 * it is not one or has more than max_digits digits. */
static Py_ssize_t
canonical(const char *s, Py_ssize_t start, Py_ssize_t end, Py_ssize_t max_digits)
{
    Py_ssize_t len = end - start;
    if (len <= 0 || len > max_digits)
        return -1;
    if (s[start] == '0')
        return len == 1 ? 0 : -1;
    Py_ssize_t value = 0;
    for (Py_ssize_t i = start; i < end; i++) {
        char c = s[i];
        if (c < '0' || c > '9')
            return -1;
        value = value * 10 + (c - '0');
    }
    return value;
}

/* A limit argument; one past what a Py_ssize_t holds is clamped, since no
 * buffer reaches it anyway.  -1 with an exception set on an error. */
static int
limit_arg(PyObject *obj, Py_ssize_t *limit)
{
    int overflow;
    long long value = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (value == -1 && PyErr_Occurred())
        return -1;
    if (overflow > 0 || value > PY_SSIZE_T_MAX)
        *limit = PY_SSIZE_T_MAX;
    else if (overflow < 0 || value < -PY_SSIZE_T_MAX)
        *limit = -PY_SSIZE_T_MAX;
    else
        *limit = (Py_ssize_t)value;
    return 0;
}

static int
bytes_arg(PyObject *obj)
{
    if (PyBytes_CheckExact(obj))
        return 0;
    PyErr_Format(PyExc_TypeError, "expected bytes, not %.100s", Py_TYPE(obj)->tp_name);
    return -1;
}

PyDoc_STRVAR(only_gets_doc,
"only_gets(data, gets_known) -> list[bytes] | None\n\n"
"The keys, if data is exactly whole 'GET key' requests (name GET or get) in\n"
"canonical multibulk form, each key shorter than gets_known; else None.");

static PyObject *
only_gets(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "only_gets takes 2 arguments");
        return NULL;
    }
    if (bytes_arg(args[0]) < 0)
        return NULL;
    Py_ssize_t known;
    if (limit_arg(args[1], &known) < 0)
        return NULL;
    const char *s = PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    /* "*2\r\n$3\r\nGET\r\n$" then digits, CRLF, the key, CRLF: 19 bytes at least */
    if (n < 19)
        Py_RETURN_NONE;
    PyObject *keys = PyList_New(0);
    if (keys == NULL)
        return NULL;
    Py_ssize_t p = 0;
    while (p < n) {
        if (n - p < 19 || memcmp(s + p, "*2\r\n$3\r\n", 8) != 0)
            goto none;
        const char *name = s + p + 8;
        if (!(memcmp(name, "GET\r\n$", 6) == 0 || memcmp(name, "get\r\n$", 6) == 0))
            goto none;
        p += 14;  /* at the key's length */
        Py_ssize_t size;
        if (s[p] == '0') {
            size = 0;
            p += 1;
        } else {
            size = 0;
            while (p < n && s[p] >= '0' && s[p] <= '9') {
                size = size * 10 + (s[p] - '0');
                if (size >= known)
                    goto none;
                p++;
            }
            if (s[p - 1] == '$')  /* no digit */
                goto none;
        }
        if (size >= known || n - p < size + 4 || s[p] != '\r' || s[p + 1] != '\n')
            goto none;
        p += 2;
        if (find_crlf(s, p, p + size + 2) != p + size)
            goto none;
        PyObject *key = PyBytes_FromStringAndSize(s + p, size);
        if (key == NULL)
            goto error;
        int failed = PyList_Append(keys, key);
        Py_DECREF(key);
        if (failed < 0)
            goto error;
        p += size + 2;
    }
    return keys;
none:
    Py_DECREF(keys);
    Py_RETURN_NONE;
error:
    Py_DECREF(keys);
    return NULL;
}

PyDoc_STRVAR(parse_split_doc,
"parse_split(buf, max_count, max_size) -> (list[list[bytes]], int)\n\n"
"The leading whole multibulk requests of buf whose counts (at most 9999\n"
"and max_count) and bulk headers (the canonical length of what follows, at\n"
"most max_size) are canonical, and the offset where the rest begins.");

/* The request at p, appended to out; the offset after it, -1 when it is not
 * one to take, -2 on an error (raised). */
static Py_ssize_t
one_request(const char *s, Py_ssize_t n, Py_ssize_t p, Py_ssize_t max_count,
            Py_ssize_t max_size, PyObject *out)
{
    Py_ssize_t q = find_crlf(s, p, n);
    if (q < 0 || s[p] != '*')
        return -1;
    Py_ssize_t count = canonical(s, p + 1, q, 4);
    if (count <= 0 || count > max_count)
        return -1;
    /* each argument takes 4 bytes at least ("$0" CRLF, CRLF) */
    if ((n - q - 2) / 4 < count)
        return -1;
    PyObject *args = PyList_New(count);
    if (args == NULL)
        return -2;
    Py_ssize_t r = q + 2;
    for (Py_ssize_t j = 0; j < count; j++) {
        Py_ssize_t h = find_crlf(s, r, n);
        if (h < 0 || s[r] != '$')
            goto skip;
        Py_ssize_t size = canonical(s, r + 1, h, 18);
        if (size < 0 || size > max_size || size > n)
            goto skip;
        Py_ssize_t a = h + 2;
        if (n - a < size + 2 || find_crlf(s, a, a + size + 2) != a + size)
            goto skip;
        PyObject *arg = PyBytes_FromStringAndSize(s + a, size);
        if (arg == NULL) {
            Py_DECREF(args);
            return -2;
        }
        PyList_SET_ITEM(args, j, arg);
        r = a + size + 2;
    }
    if (PyList_Append(out, args) < 0) {
        Py_DECREF(args);
        return -2;
    }
    Py_DECREF(args);
    return r;
skip:
    Py_DECREF(args);  /* the items not set yet are NULL: list_dealloc skips them */
    return -1;
}

static PyObject *
parse_split(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "parse_split takes 3 arguments");
        return NULL;
    }
    if (bytes_arg(args[0]) < 0)
        return NULL;
    Py_ssize_t max_count, max_size;
    if (limit_arg(args[1], &max_count) < 0 || limit_arg(args[2], &max_size) < 0)
        return NULL;
    const char *s = PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    Py_ssize_t p = 0;
    while (p < n) {
        Py_ssize_t next = one_request(s, n, p, max_count, max_size, out);
        if (next == -2) {
            Py_DECREF(out);
            return NULL;
        }
        if (next < 0)
            break;
        p = next;
    }
    PyObject *pos = PyLong_FromSsize_t(p);
    if (pos == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    PyObject *result = PyTuple_New(2);
    if (result == NULL) {
        Py_DECREF(out);
        Py_DECREF(pos);
        return NULL;
    }
    PyTuple_SET_ITEM(result, 0, out);
    PyTuple_SET_ITEM(result, 1, pos);
    return result;
}

/* "$<size>\r\n" written at dst (when not NULL); its length. */
static Py_ssize_t
bulk_header(char *dst, Py_ssize_t size)
{
    char digits[24];
    Py_ssize_t n = 0;
    do {
        digits[n++] = (char)('0' + size % 10);
        size /= 10;
    } while (size);
    if (dst != NULL) {
        *dst++ = '$';
        for (Py_ssize_t i = n - 1; i >= 0; i--)
            *dst++ = digits[i];
        *dst++ = '\r';
        *dst = '\n';
    }
    return n + 3;
}

PyDoc_STRVAR(bulks_doc,
"bulks(values, limit) -> bytes | None\n\n"
"Each value as a RESP bulk string, all in one bytes object, if values is a\n"
"list of exact bytes whose sizes plus 16 a value are at most limit; else\n"
"None (the caller's general way).");

static PyObject *
bulks(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "bulks takes 2 arguments");
        return NULL;
    }
    PyObject *values = args[0];
    Py_ssize_t limit;
    if (limit_arg(args[1], &limit) < 0)
        return NULL;
    if (!PyList_CheckExact(values) || limit < 0)
        Py_RETURN_NONE;
    Py_ssize_t count = PyList_GET_SIZE(values);
    Py_ssize_t budget = 0, total = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *value = PyList_GET_ITEM(values, i);
        if (!PyBytes_CheckExact(value))
            Py_RETURN_NONE;
        Py_ssize_t size = PyBytes_GET_SIZE(value);
        if (size > limit - budget - 16)  /* no overflow: size and budget <= limit */
            Py_RETURN_NONE;
        budget += size + 16;
        total += bulk_header(NULL, size) + size + 2;
    }
    /* nothing above ran Python code or released the list: it is as it was */
    PyObject *reply = PyBytes_FromStringAndSize(NULL, total);
    if (reply == NULL)
        return NULL;
    char *out = PyBytes_AS_STRING(reply);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *value = PyList_GET_ITEM(values, i);
        Py_ssize_t size = PyBytes_GET_SIZE(value);
        out += bulk_header(out, size);
        memcpy(out, PyBytes_AS_STRING(value), (size_t)size);
        out += size;
        *out++ = '\r';
        *out++ = '\n';
    }
    return reply;
}

static PyMethodDef resp_methods[] = {
    {"only_gets", (PyCFunction)(void (*)(void))only_gets, METH_FASTCALL, only_gets_doc},
    {"parse_split", (PyCFunction)(void (*)(void))parse_split, METH_FASTCALL, parse_split_doc},
    {"bulks", (PyCFunction)(void (*)(void))bulks, METH_FASTCALL, bulks_doc},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef resp_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "redisp.protocol._resp",
    .m_doc = "The RESP door's fast parsers and GET reply writer in C (optional: "
             "redisp.resp and redisp.replies fall back to Python without it).",
    .m_size = -1,
    .m_methods = resp_methods,
};

PyMODINIT_FUNC
PyInit__resp(void)
{
    return PyModule_Create(&resp_module);
}
