/* redisp.core._lru: LruDict, a compact ordered mapping of bytes to bytes for the cache.
 *
 * The subset of OrderedDict that redisp.core.cache uses (get, move_to_end,
 * popitem(last=False), item assignment and deletion, pop, clear, len), kept in
 * least- to most-recently-used order like an OrderedDict, in about a third of
 * its memory per entry: see bench/NOTES-perf.md ("Issue 12, cache memory").
 *
 * Layout: a dense array of slots (key, value, prev, next; links are slot
 * numbers) and an open-addressing index of slot numbers, linear probing,
 * at most half full.  Deletion shifts the probe chain back (no tombstones),
 * so a table under churn never grows past what its entries need: the
 * CPython dict under an OrderedDict does (deleted entries fill its entry
 * array until a resize, and it resizes to three times the entries).
 * Freed slots are reused through a free list; the arrays shrink only on
 * clear().
 *
 * Keys and values must be exact bytes objects: their hashing, comparison and
 * deallocation run no Python code, so nothing can re-enter the table while it
 * is being changed, and they cannot form reference cycles (no GC support
 * needed).  Every operation is O(1) (amortised for the growth of the arrays).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define NIL UINT32_MAX          /* no slot: end of a list, empty index cell */
#define MAX_ENTRIES (UINT32_MAX / 4)
#define MIN_INDEX 8

typedef struct {
    PyObject *key;              /* NULL: the slot is free */
    PyObject *value;
    uint32_t prev, next;        /* LRU neighbours; next also links free slots */
} Slot;

typedef struct {
    PyObject_HEAD
    Slot *slots;
    uint32_t nslots;            /* slots allocated */
    uint32_t fresh;             /* slots [0, fresh) have been handed out */
    uint32_t free;              /* first free slot below fresh, or NIL */
    uint32_t *index;            /* slot numbers by hash, NIL when empty */
    size_t mask;                /* index size - 1 (a power of two) */
    Py_ssize_t count;
    uint32_t head, tail;        /* least and most recently used, or NIL */
} LruDict;

static int
check_bytes(PyObject *obj, const char *what)
{
    if (PyBytes_CheckExact(obj))
        return 0;
    PyErr_Format(PyExc_TypeError, "LruDict %s must be bytes, not %.100s",
                 what, Py_TYPE(obj)->tp_name);
    return -1;
}

/* The index cell holding key's slot, or the empty cell where it would go. */
static size_t
find_cell(LruDict *d, PyObject *key, Py_hash_t hash)
{
    size_t mask = d->mask, i = (size_t)hash & mask;
    Py_ssize_t size = PyBytes_GET_SIZE(key);
    const char *data = PyBytes_AS_STRING(key);
    for (;;) {
        uint32_t s = d->index[i];
        if (s == NIL)
            return i;
        PyObject *k = d->slots[s].key;
        if (k == key || (PyBytes_GET_SIZE(k) == size
                         && memcmp(PyBytes_AS_STRING(k), data, size) == 0))
            return i;
        i = (i + 1) & mask;
    }
}

/* key's slot, or NIL; -1 in *error on a failure (never for bytes). */
static uint32_t
lookup(LruDict *d, PyObject *key, size_t *cell)
{
    Py_hash_t hash = PyObject_Hash(key);  /* cached by the bytes object */
    size_t i = find_cell(d, key, hash);
    if (cell)
        *cell = i;
    return d->index[i];
}

static void
unlink_slot(LruDict *d, uint32_t s)
{
    Slot *slot = &d->slots[s];
    if (slot->prev == NIL)
        d->head = slot->next;
    else
        d->slots[slot->prev].next = slot->next;
    if (slot->next == NIL)
        d->tail = slot->prev;
    else
        d->slots[slot->next].prev = slot->prev;
}

static void
append_slot(LruDict *d, uint32_t s)
{
    Slot *slot = &d->slots[s];
    slot->prev = d->tail;
    slot->next = NIL;
    if (d->tail == NIL)
        d->head = s;
    else
        d->slots[d->tail].next = s;
    d->tail = s;
}

/* Empty index cell i, shifting the rest of its probe chain back. */
static void
delete_cell(LruDict *d, size_t i)
{
    size_t mask = d->mask, j = i;
    for (;;) {
        j = (j + 1) & mask;
        uint32_t s = d->index[j];
        if (s == NIL)
            break;
        size_t home = (size_t)PyObject_Hash(d->slots[s].key) & mask;
        /* the entry at j may move to i unless its home lies in (i, j] */
        if (i <= j ? (home <= i || home > j) : (home <= i && home > j)) {
            d->index[i] = s;
            i = j;
        }
    }
    d->index[i] = NIL;
}

static int
resize_index(LruDict *d, size_t size)
{
    uint32_t *index = PyMem_Malloc(size * sizeof(uint32_t));
    if (index == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memset(index, 0xff, size * sizeof(uint32_t));
    PyMem_Free(d->index);
    d->index = index;
    d->mask = size - 1;
    for (uint32_t s = d->head; s != NIL; s = d->slots[s].next) {
        size_t i = (size_t)PyObject_Hash(d->slots[s].key) & d->mask;
        while (index[i] != NIL)
            i = (i + 1) & d->mask;
        index[i] = s;
    }
    return 0;
}

/* A slot for a new entry (key and value unset), or NIL with MemoryError. */
static uint32_t
take_slot(LruDict *d)
{
    uint32_t s = d->free;
    if (s != NIL) {
        d->free = d->slots[s].next;
        return s;
    }
    if (d->fresh == d->nslots) {
        uint32_t n = d->nslots ? d->nslots * 2 : 8;
        Slot *slots = PyMem_Realloc(d->slots, (size_t)n * sizeof(Slot));
        if (slots == NULL) {
            PyErr_NoMemory();
            return NIL;
        }
        d->slots = slots;
        d->nslots = n;
    }
    return d->fresh++;
}

/* Unlink and free slot s (in index cell i); returns its key and value as
 * new references in *key and *value (the caller drops them). */
static void
remove_slot(LruDict *d, uint32_t s, size_t i, PyObject **key, PyObject **value)
{
    Slot *slot = &d->slots[s];
    delete_cell(d, i);
    unlink_slot(d, s);
    *key = slot->key;
    *value = slot->value;
    slot->key = slot->value = NULL;
    slot->next = d->free;
    d->free = s;
    d->count--;
}

static int
set_item(LruDict *d, PyObject *key, PyObject *value)
{
    if (check_bytes(key, "keys") < 0 || check_bytes(value, "values") < 0)
        return -1;
    size_t i;
    uint32_t s = lookup(d, key, &i);
    if (s != NIL) {  /* as OrderedDict: the key keeps its place */
        PyObject *old = d->slots[s].value;
        Py_INCREF(value);
        d->slots[s].value = value;
        Py_DECREF(old);
        return 0;
    }
    if (d->count >= (Py_ssize_t)MAX_ENTRIES) {
        PyErr_SetString(PyExc_OverflowError, "LruDict is full");
        return -1;
    }
    if ((size_t)(d->count + 1) * 2 > d->mask + 1) {
        if (resize_index(d, (d->mask + 1) * 2) < 0)
            return -1;
        i = find_cell(d, key, PyObject_Hash(key));
    }
    s = take_slot(d);
    if (s == NIL)
        return -1;
    Py_INCREF(key);
    Py_INCREF(value);
    d->slots[s].key = key;
    d->slots[s].value = value;
    append_slot(d, s);
    d->index[i] = s;
    d->count++;
    return 0;
}

static int
del_item(LruDict *d, PyObject *key, int missing_ok)
{
    size_t i;
    uint32_t s = lookup(d, key, &i);
    if (s == NIL) {
        if (missing_ok)
            return 0;
        PyErr_SetObject(PyExc_KeyError, key);
        return -1;
    }
    PyObject *k, *v;
    remove_slot(d, s, i, &k, &v);
    Py_DECREF(k);
    Py_DECREF(v);
    return 1;
}

static void
drop_all(LruDict *d)
{
    Slot *slots = d->slots;
    uint32_t fresh = d->fresh;
    d->slots = NULL;
    d->nslots = d->fresh = 0;
    d->free = d->head = d->tail = NIL;
    d->count = 0;
    PyMem_Free(d->index);
    d->index = NULL;
    d->mask = 0;
    for (uint32_t s = 0; s < fresh; s++) {
        Py_XDECREF(slots[s].key);
        Py_XDECREF(slots[s].value);
    }
    PyMem_Free(slots);
}

static int
init_index(LruDict *d)
{
    d->index = PyMem_Malloc(MIN_INDEX * sizeof(uint32_t));
    if (d->index == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memset(d->index, 0xff, MIN_INDEX * sizeof(uint32_t));
    d->mask = MIN_INDEX - 1;
    return 0;
}

/* -- the type ---------------------------------------------------------------- */

static PyObject *
LruDict_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) || (kwds && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "LruDict() takes no arguments");
        return NULL;
    }
    LruDict *d = (LruDict *)type->tp_alloc(type, 0);
    if (d == NULL)
        return NULL;
    d->slots = NULL;
    d->nslots = d->fresh = 0;
    d->free = d->head = d->tail = NIL;
    d->count = 0;
    if (init_index(d) < 0) {
        Py_DECREF(d);
        return NULL;
    }
    return (PyObject *)d;
}

static void
LruDict_dealloc(LruDict *d)
{
    drop_all(d);
    Py_TYPE(d)->tp_free((PyObject *)d);
}

static Py_ssize_t
LruDict_len(LruDict *d)
{
    return d->count;
}

static PyObject *
LruDict_subscript(LruDict *d, PyObject *key)
{
    if (check_bytes(key, "keys") < 0)
        return NULL;
    uint32_t s = lookup(d, key, NULL);
    if (s == NIL) {
        PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    return Py_NewRef(d->slots[s].value);
}

static int
LruDict_ass_subscript(LruDict *d, PyObject *key, PyObject *value)
{
    if (value == NULL) {
        if (check_bytes(key, "keys") < 0)
            return -1;
        return del_item(d, key, 0) < 0 ? -1 : 0;
    }
    return set_item(d, key, value);
}

static int
LruDict_contains(LruDict *d, PyObject *key)
{
    if (check_bytes(key, "keys") < 0)
        return -1;
    return lookup(d, key, NULL) != NIL;
}

PyDoc_STRVAR(get_doc, "get(key, default=None): the value of key, or default.");

static PyObject *
LruDict_get(LruDict *d, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get() takes 1 or 2 arguments");
        return NULL;
    }
    PyObject *key = args[0];
    if (check_bytes(key, "keys") < 0)
        return NULL;
    uint32_t s = lookup(d, key, NULL);
    if (s != NIL)
        return Py_NewRef(d->slots[s].value);
    return Py_NewRef(nargs == 2 ? args[1] : Py_None);
}

PyDoc_STRVAR(move_to_end_doc, "move_to_end(key): make key the most recently used.");

static PyObject *
LruDict_move_to_end(LruDict *d, PyObject *key)
{
    if (check_bytes(key, "keys") < 0)
        return NULL;
    uint32_t s = lookup(d, key, NULL);
    if (s == NIL) {
        PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    if (s != d->tail) {
        unlink_slot(d, s);
        append_slot(d, s);
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(touch_all_doc,
"touch_all(keys, floor): the values of keys (a list of bytes), in order, if\n"
"every key is present with a value >= floor (compared as bytes), each then\n"
"made the most recently used in turn; else None and nothing changed.");

/* Batches up to this many keys use the stack for their bookkeeping. */
#define TOUCH_STACK 64

/* The value of a bytes comparison a < b, as Python's. */
static int
bytes_less(PyObject *a, PyObject *b)
{
    Py_ssize_t la = PyBytes_GET_SIZE(a), lb = PyBytes_GET_SIZE(b);
    int cmp = memcmp(PyBytes_AS_STRING(a), PyBytes_AS_STRING(b), la < lb ? la : lb);
    return cmp < 0 || (cmp == 0 && la < lb);
}

/* In phases over the whole batch rather than key by key, so that the memory
 * reads of different keys (index cell, slot, key and value objects) are in
 * flight together: in a table much larger than the CPU caches each is a
 * miss, and a key-by-key walk pays them one after the other. */
static PyObject *
LruDict_touch_all(LruDict *d, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "touch_all() takes 2 arguments");
        return NULL;
    }
    PyObject *keys = args[0], *floor = args[1];
    if (!PyList_CheckExact(keys)) {
        PyErr_SetString(PyExc_TypeError, "touch_all() keys must be a list");
        return NULL;
    }
    if (check_bytes(floor, "floor") < 0)
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(keys);
    uint32_t stack_slots[TOUCH_STACK];
    Py_hash_t stack_hashes[TOUCH_STACK];
    uint32_t *slots = stack_slots;
    Py_hash_t *hashes = stack_hashes;
    PyObject *result = NULL;
    if (n > TOUCH_STACK) {
        slots = PyMem_Malloc((size_t)n * sizeof(uint32_t));
        hashes = PyMem_Malloc((size_t)n * sizeof(Py_hash_t));
        if (slots == NULL || hashes == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    size_t mask = d->mask;
    for (Py_ssize_t i = 0; i < n; i++) {  /* hashes; the index cells asked for */
        PyObject *key = PyList_GET_ITEM(keys, i);
        if (check_bytes(key, "keys") < 0)
            goto done;
        hashes[i] = PyObject_Hash(key);
        __builtin_prefetch(&d->index[(size_t)hashes[i] & mask]);
    }
    for (Py_ssize_t i = 0; i < n; i++) {  /* the slot each first cell names */
        uint32_t s = d->index[(size_t)hashes[i] & mask];
        if (s != NIL)
            __builtin_prefetch(&d->slots[s]);
    }
    for (Py_ssize_t i = 0; i < n; i++) {  /* that slot's key and value objects */
        uint32_t s = d->index[(size_t)hashes[i] & mask];
        if (s != NIL) {
            __builtin_prefetch(d->slots[s].key);
            __builtin_prefetch(d->slots[s].value);
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {  /* the lookups themselves */
        uint32_t s = d->index[find_cell(d, PyList_GET_ITEM(keys, i), hashes[i])];
        if (s == NIL || bytes_less(d->slots[s].value, floor)) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        slots[i] = s;
    }
    result = PyList_New(n);
    if (result == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t s = slots[i];
        if (s != d->tail) {
            unlink_slot(d, s);
            append_slot(d, s);
        }
        PyList_SET_ITEM(result, i, Py_NewRef(d->slots[s].value));
    }
done:
    if (slots != stack_slots)
        PyMem_Free(slots);
    if (hashes != stack_hashes)
        PyMem_Free(hashes);
    return result;
}

PyDoc_STRVAR(popitem_doc,
"popitem(last=True): remove and return the (key, value) pair most recently\n"
"used if last is true, else the least recently used.");

static PyObject *
LruDict_popitem(LruDict *d, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "popitem() takes at most 1 argument");
        return NULL;
    }
    int last = 1;
    if (nargs == 1 && (last = PyObject_IsTrue(args[0])) < 0)
        return NULL;
    if (d->count == 0) {
        PyErr_SetString(PyExc_KeyError, "dictionary is empty");
        return NULL;
    }
    uint32_t s = last ? d->tail : d->head;
    size_t i;
    lookup(d, d->slots[s].key, &i);
    PyObject *k, *v;
    remove_slot(d, s, i, &k, &v);
    PyObject *item = PyTuple_Pack(2, k, v);
    Py_DECREF(k);
    Py_DECREF(v);
    return item;
}

PyDoc_STRVAR(pop_doc,
"pop(key[, default]): remove key and return its value, or default when\n"
"absent (KeyError without a default).");

static PyObject *
LruDict_pop(LruDict *d, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "pop() takes 1 or 2 arguments");
        return NULL;
    }
    PyObject *key = args[0];
    if (check_bytes(key, "keys") < 0)
        return NULL;
    size_t i;
    uint32_t s = lookup(d, key, &i);
    if (s == NIL) {
        if (nargs == 2)
            return Py_NewRef(args[1]);
        PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    PyObject *k, *v;
    remove_slot(d, s, i, &k, &v);
    Py_DECREF(k);
    return v;
}

PyDoc_STRVAR(clear_doc, "clear(): remove everything and give the memory back.");

static PyObject *
LruDict_clear(LruDict *d, PyObject *Py_UNUSED(ignored))
{
    drop_all(d);
    if (init_index(d) < 0)
        return NULL;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(keys_doc, "keys(): a list of the keys, least recently used first.");

static PyObject *
LruDict_keys(LruDict *d, PyObject *Py_UNUSED(ignored))
{
    PyObject *keys = PyList_New(d->count);
    if (keys == NULL)
        return NULL;
    Py_ssize_t n = 0;
    for (uint32_t s = d->head; s != NIL; s = d->slots[s].next)
        PyList_SET_ITEM(keys, n++, Py_NewRef(d->slots[s].key));
    return keys;
}

static PyMethodDef LruDict_methods[] = {
    {"get", (PyCFunction)(void (*)(void))LruDict_get, METH_FASTCALL, get_doc},
    {"touch_all", (PyCFunction)(void (*)(void))LruDict_touch_all, METH_FASTCALL,
     touch_all_doc},
    {"move_to_end", (PyCFunction)LruDict_move_to_end, METH_O, move_to_end_doc},
    {"popitem", (PyCFunction)(void (*)(void))LruDict_popitem, METH_FASTCALL, popitem_doc},
    {"pop", (PyCFunction)(void (*)(void))LruDict_pop, METH_FASTCALL, pop_doc},
    {"clear", (PyCFunction)LruDict_clear, METH_NOARGS, clear_doc},
    {"keys", (PyCFunction)LruDict_keys, METH_NOARGS, keys_doc},
    {NULL, NULL, 0, NULL}
};

static PyMappingMethods LruDict_as_mapping = {
    (lenfunc)LruDict_len,
    (binaryfunc)LruDict_subscript,
    (objobjargproc)LruDict_ass_subscript,
};

static PySequenceMethods LruDict_as_sequence = {
    .sq_contains = (objobjproc)LruDict_contains,
};

PyDoc_STRVAR(LruDict_doc,
"LruDict(): bytes keys to bytes values in least- to most-recently-used order.\n"
"\n"
"The part of OrderedDict's interface the cache uses, in less memory.");

static PyTypeObject LruDict_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "redisp.core._lru.LruDict",
    .tp_basicsize = sizeof(LruDict),
    .tp_dealloc = (destructor)LruDict_dealloc,
    .tp_as_sequence = &LruDict_as_sequence,
    .tp_as_mapping = &LruDict_as_mapping,
    .tp_hash = PyObject_HashNotImplemented,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = LruDict_doc,
    .tp_methods = LruDict_methods,
    .tp_new = LruDict_new,
};

static struct PyModuleDef lru_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "redisp.core._lru",
    .m_doc = "A compact LRU-ordered mapping for redisp.core.cache (optional: "
             "redisp.core.cache falls back to OrderedDict without it).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__lru(void)
{
    if (PyType_Ready(&LruDict_Type) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&lru_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&LruDict_Type);
    if (PyModule_AddObject(m, "LruDict", (PyObject *)&LruDict_Type) < 0) {
        Py_DECREF(&LruDict_Type);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
