/* One pass over SGLang's per-position top-K lists into padded arrays, called through ctypes (PyDLL, the GIL
 * held) by ta_opd/topk.py's pack_topk.
 *
 * ``_clean_row`` in ta_opd/topk.py is the specification. This pass fills only the rows that it would return
 * unchanged, the "clean" rows: 1..k entries, each a list or tuple whose first item is a Python float or int
 * and whose second item is a Python int, log-probs finite once rounded to float32, ids in [0, 2^40), ids
 * distinct, log-probs non-increasing (best first; equal values keep their order, as the stable sort does).
 * Every other non-empty row is flagged for the Python path, which also raises the errors. An empty or None
 * row is all padding. Log-probs are read as doubles and rounded to float32, as torch.tensor does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_TOKEN_ID (((int64_t)1) << 40)

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* 1 if the row was written (clean), 0 if it must take the Python path. */
static int pack_row(PyObject *row, int64_t k, int64_t *ids, float *logp, int64_t *scratch) {
    PyObject **items = PySequence_Fast_ITEMS(row);
    Py_ssize_t m = PySequence_Fast_GET_SIZE(row);
    if (m > k) return 0;
    double prev = INFINITY;
    for (Py_ssize_t j = 0; j < m; j++) {
        PyObject *e = items[j];
        if (!PyList_CheckExact(e) && !PyTuple_CheckExact(e)) return 0;
        if (PySequence_Fast_GET_SIZE(e) < 2) return 0;
        PyObject **pair = PySequence_Fast_ITEMS(e);
        PyObject *lp_obj = pair[0], *id_obj = pair[1];
        double lp;
        if (PyFloat_CheckExact(lp_obj)) {
            lp = PyFloat_AS_DOUBLE(lp_obj);
        } else if (PyLong_Check(lp_obj)) {
            lp = PyLong_AsDouble(lp_obj);
            if (lp == -1.0 && PyErr_Occurred()) {
                PyErr_Clear();
                return 0;
            }
        } else {
            return 0;
        }
        if (!PyLong_Check(id_obj)) return 0;
        int overflow = 0;
        long long tid = PyLong_AsLongLongAndOverflow(id_obj, &overflow);
        if (overflow || (tid == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return 0;
        }
        float lp32 = (float)lp;
        if (!isfinite(lp32) || tid < 0 || tid >= MAX_TOKEN_ID || lp > prev) return 0;
        prev = lp;
        ids[j] = (int64_t)tid;
        logp[j] = lp32;
        scratch[j] = (int64_t)tid;
    }
    if (m > 1) {
        qsort(scratch, (size_t)m, sizeof(int64_t), cmp_i64);
        for (Py_ssize_t j = 1; j < m; j++)
            if (scratch[j] == scratch[j - 1]) return 0;
    }
    return 1;
}

/* rows: a list of rows (each None, or a list/tuple of entries). ids [n, k] and logp [n, k] must arrive
 * filled with the padding (-1, -inf); a row that is not clean is left as padding and flagged in slow[n].
 * Returns the number of flagged rows, or -1 if ``rows`` is not a list of length n (nothing flagged then). */
int64_t ta_pack_topk(PyObject *rows, int64_t n, int64_t k, int64_t *ids, float *logp, uint8_t *slow) {
    if (!PyList_CheckExact(rows) || PyList_GET_SIZE(rows) != n || k <= 0) return -1;
    int64_t *scratch = (int64_t *)malloc((size_t)k * sizeof(int64_t));
    if (scratch == NULL) return -1;
    int64_t n_slow = 0;
    for (int64_t i = 0; i < n; i++) {
        PyObject *row = PyList_GET_ITEM(rows, i);
        slow[i] = 0;
        if (row == Py_None) continue;
        if (!PyList_CheckExact(row) && !PyTuple_CheckExact(row)) {
            slow[i] = 1; /* any other sequence: the Python path reads it */
            n_slow++;
            continue;
        }
        if (PySequence_Fast_GET_SIZE(row) == 0) continue;
        if (!pack_row(row, k, ids + i * k, logp + i * k, scratch)) {
            for (int64_t j = 0; j < k; j++) { /* undo a partly written row */
                ids[i * k + j] = -1;
                logp[i * k + j] = -INFINITY;
            }
            slow[i] = 1;
            n_slow++;
        }
    }
    free(scratch);
    return n_slow;
}
