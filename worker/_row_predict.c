/* One row through LightGBM's fast single-row C API without Python in between.
 *
 * Why C: for a small model the fast call itself is a few hundred nanoseconds, and Python around
 * a ctypes call costs as much again (argument conversion, copy in, list out; see
 * worker/predictor.py). Here the copy in, the call and the list out are one C function. The
 * LightGBM function is the one in the library that `lightgbm` loaded: Python passes its address,
 * so nothing here links against LightGBM.
 *
 * RowPredictor(fn_address, fast_config, num_features, num_classes) owns one row buffer and one
 * output buffer. Calling it with one row (a C-contiguous 1-D float64 buffer such as an ndarray,
 * a list or tuple of floats and ints, or any other sequence of them, such as a protobuf repeated
 * field) returns the predictions as a list of floats. Anything else -- another length, another
 * dtype, a non-number, a closed predictor, a call while another thread is inside this one, or an
 * error from LightGBM -- returns None, and the caller takes its validating path, which says what
 * is wrong.
 *
 * Concurrency: the GIL is held throughout, so calls do not interleave, except that converting a
 * foreign sequence may run Python code, which may let another thread in: `busy` sends that
 * thread to the caller's own path instead of into these buffers. `close()` forgets the fast
 * config; it is read after the copy in, with the GIL held and no Python code before the call,
 * so a close that ran meanwhile is seen and its freed config never used.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if PY_LITTLE_ENDIAN
#define NATIVE_ORDER '<'
#else
#define NATIVE_ORDER '>'
#endif

typedef int (*fast_predict_fn)(void *fast_config, const void *row, int64_t *out_len, double *out);

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    fast_predict_fn fn;
    void *fast_config; /* NULL once closed */
    Py_ssize_t num_features;
    Py_ssize_t num_classes;
    int busy;
    double *row;
    double *out;
} RowPredictor;

static int
copy_number(PyObject *item, double *into)
{
    if (PyFloat_Check(item)) { /* a subclass too (numpy.float64): its value is read, no method runs */
        *into = PyFloat_AS_DOUBLE(item);
        return 0;
    }
    if (PyLong_CheckExact(item)) {
        double value = PyLong_AsDouble(item);
        if (value == -1.0 && PyErr_Occurred()) {
            return -1;
        }
        *into = value;
        return 0;
    }
    return -1; /* no user-defined __float__: it could run anything */
}

/* 0: the row is in self->row; -1: not one row in a form taken here (no exception left set). */
static int
copy_row(RowPredictor *self, PyObject *features)
{
    Py_ssize_t n = self->num_features;
    if (PyList_CheckExact(features) || PyTuple_CheckExact(features)) {
        if (PySequence_Fast_GET_SIZE(features) != n) {
            return -1;
        }
        PyObject **items = PySequence_Fast_ITEMS(features);
        for (Py_ssize_t i = 0; i < n; i++) {
            if (copy_number(items[i], &self->row[i]) < 0) {
                PyErr_Clear();
                return -1;
            }
        }
        return 0;
    }
    if (PyObject_CheckBuffer(features)) {
        Py_buffer view;
        if (PyObject_GetBuffer(features, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
            PyErr_Clear();
            return -1;
        }
        const char *format = view.format;
        if (format != NULL && (format[0] == NATIVE_ORDER || format[0] == '=' || format[0] == '@')) {
            format++; /* native byte order said explicitly; another order goes to the caller's path */
        }
        int ok = view.ndim == 1 && view.itemsize == (Py_ssize_t)sizeof(double) && format != NULL
                 && format[0] == 'd' && format[1] == '\0' && view.len == n * (Py_ssize_t)sizeof(double);
        if (ok) {
            memcpy(self->row, view.buf, (size_t)view.len);
        }
        PyBuffer_Release(&view);
        return ok ? 0 : -1;
    }
    if (!PySequence_Check(features) || PySequence_Size(features) != n) {
        PyErr_Clear();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) { /* item by item: no list built */
        PyObject *item = PySequence_GetItem(features, i);
        int rc = item == NULL ? -1 : copy_number(item, &self->row[i]);
        Py_XDECREF(item);
        if (rc < 0) {
            PyErr_Clear();
            return -1;
        }
    }
    return 0;
}

static PyObject *
RowPredictor_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    RowPredictor *self = (RowPredictor *)callable;
    if (PyVectorcall_NARGS(nargsf) != 1 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "RowPredictor takes one argument: the features");
        return NULL;
    }
    if (self->busy || self->fast_config == NULL) {
        Py_RETURN_NONE;
    }
    self->busy = 1;
    int copied = copy_row(self, args[0]);
    self->busy = 0;
    void *fast_config = self->fast_config; /* after the copy: a close may have run inside it */
    if (copied < 0 || fast_config == NULL) {
        Py_RETURN_NONE;
    }
    int64_t out_len = 0;
    if (self->fn(fast_config, self->row, &out_len, self->out) != 0 || out_len != self->num_classes) {
        Py_RETURN_NONE; /* the caller's path calls again and reports LightGBM's error */
    }
    PyObject *values = PyList_New(self->num_classes);
    if (values == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < self->num_classes; i++) {
        PyObject *value = PyFloat_FromDouble(self->out[i]);
        if (value == NULL) {
            Py_DECREF(values);
            return NULL;
        }
        PyList_SET_ITEM(values, i, value);
    }
    return values;
}

static PyObject *
RowPredictor_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"fn_address", "fast_config", "num_features", "num_classes", NULL};
    unsigned long long fn_address, fast_config;
    Py_ssize_t num_features, num_classes;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "KKnn", keywords, &fn_address, &fast_config,
                                     &num_features, &num_classes)) {
        return NULL;
    }
    if (fn_address == 0 || fast_config == 0 || num_features < 1 || num_classes < 1) {
        PyErr_SetString(PyExc_ValueError, "RowPredictor needs a function, a fast config, and at least "
                                          "one feature and one class");
        return NULL;
    }
    RowPredictor *self = (RowPredictor *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = RowPredictor_vectorcall;
    self->fn = (fast_predict_fn)(uintptr_t)fn_address;
    self->fast_config = (void *)(uintptr_t)fast_config;
    self->num_features = num_features;
    self->num_classes = num_classes;
    self->row = PyMem_Calloc((size_t)num_features, sizeof(double));
    self->out = PyMem_Calloc((size_t)num_classes, sizeof(double));
    if (self->row == NULL || self->out == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

static void
RowPredictor_dealloc(RowPredictor *self)
{
    PyMem_Free(self->row);
    PyMem_Free(self->out);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
RowPredictor_close(RowPredictor *self, PyObject *Py_UNUSED(ignored))
{
    self->fast_config = NULL;
    Py_RETURN_NONE;
}

/* For loadtest.bench_predictor: the floor under any caller, the fast call in a C loop. */
static PyObject *
RowPredictor_time_calls(RowPredictor *self, PyObject *arg)
{
    long long calls = PyLong_AsLongLong(arg);
    if (calls == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (calls < 1 || self->fast_config == NULL) {
        PyErr_SetString(PyExc_ValueError, "time_calls needs at least one call on an open predictor");
        return NULL;
    }
    int64_t out_len = 0;
    _PyTime_t started = _PyTime_GetPerfCounter();
    for (long long i = 0; i < calls; i++) {
        if (self->fn(self->fast_config, self->row, &out_len, self->out) != 0) {
            PyErr_SetString(PyExc_RuntimeError, "LightGBM's fast call failed");
            return NULL;
        }
    }
    return PyFloat_FromDouble(_PyTime_AsSecondsDouble(_PyTime_GetPerfCounter() - started));
}

static PyObject *
RowPredictor_get_closed(RowPredictor *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->fast_config == NULL);
}

static PyMethodDef RowPredictor_methods[] = {
    {"close", (PyCFunction)RowPredictor_close, METH_NOARGS,
     "Forget the fast config (before it is freed): every later call returns None."},
    {"time_calls", (PyCFunction)RowPredictor_time_calls, METH_O,
     "Seconds for N fast calls on the last row copied in, in a C loop (a benchmark's floor)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef RowPredictor_getset[] = {
    {"closed", (getter)RowPredictor_get_closed, NULL, "Whether close() was called.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RowPredictorType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "worker._row_predict.RowPredictor",
    .tp_basicsize = sizeof(RowPredictor),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "One row through LightGBM's fast single-row call: features -> list of floats, or None.",
    .tp_new = RowPredictor_new,
    .tp_dealloc = (destructor)RowPredictor_dealloc,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(RowPredictor, vectorcall),
    .tp_methods = RowPredictor_methods,
    .tp_getset = RowPredictor_getset,
};

static struct PyModuleDef row_predict_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "worker._row_predict",
    .m_doc = "LightGBM's fast single-row prediction called from C (see worker/predictor.py).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__row_predict(void)
{
    if (PyType_Ready(&RowPredictorType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&row_predict_module);
    if (module == NULL) {
        return NULL;
    }
    Py_INCREF(&RowPredictorType);
    if (PyModule_AddObject(module, "RowPredictor", (PyObject *)&RowPredictorType) < 0) {
        Py_DECREF(&RowPredictorType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
