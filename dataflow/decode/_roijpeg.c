/*
 * Region-of-interest JPEG decoding with libjpeg-turbo: decode only the crop.
 *
 * decode_crop(data, top, left, height, width, denominator) -> (bytes, rows, cols)
 *
 * The image is decoded at 1/denominator DCT scale; rows above the crop are skipped
 * (jpeg_skip_scanlines: entropy-decoded but never inverse-transformed, upsampled or
 * colour-converted), columns outside it are cut at iMCU boundaries (jpeg_crop_scanline),
 * and decoding stops after the crop's last row (rows below are never even entropy-decoded).
 * A random-resized crop of half the image thus costs about 60 % of a full decode.
 * The crop is given in full-resolution pixels; the result is the RGB crop at the scaled
 * resolution, rows × cols × 3 bytes. Runs without the GIL. Corrupt data (a libjpeg
 * warning) or a fatal error raises ValueError with libjpeg's message.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jpeglib.h>

struct error_state {
    struct jpeg_error_mgr manager;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
    int warnings;
};

static void on_error(j_common_ptr info) {
    struct error_state *state = (struct error_state *)info->err;
    (*info->err->format_message)(info, state->message);
    longjmp(state->jump, 1);
}

static void on_message(j_common_ptr info, int level) {
    struct error_state *state = (struct error_state *)info->err;
    if (level < 0) { /* a warning: corrupt or truncated data */
        if (state->warnings == 0) {
            (*info->err->format_message)(info, state->message);
        }
        state->warnings++;
    }
}

static PyObject *decode_crop(PyObject *self, PyObject *args) {
    Py_buffer data;
    int top, left, height, width, denominator;
    if (!PyArg_ParseTuple(args, "y*iiiii", &data, &top, &left, &height, &width, &denominator)) {
        return NULL;
    }
    if (top < 0 || left < 0 || height < 1 || width < 1 ||
        (denominator != 1 && denominator != 2 && denominator != 4 && denominator != 8)) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "bad crop box or DCT scale denominator");
        return NULL;
    }
    struct jpeg_decompress_struct info;
    struct error_state state;
    unsigned char *volatile region = NULL;
    unsigned char *volatile row = NULL;
    volatile int failed = 0;
    volatile unsigned int rows = 0, cols = 0;
    memset(&state, 0, sizeof(state));
    info.err = jpeg_std_error(&state.manager);
    state.manager.error_exit = on_error;
    state.manager.emit_message = on_message;

    Py_BEGIN_ALLOW_THREADS
    if (setjmp(state.jump)) {
        failed = 1;
    } else {
        jpeg_create_decompress(&info);
        jpeg_mem_src(&info, (const unsigned char *)data.buf, (unsigned long)data.len);
        jpeg_read_header(&info, TRUE);
        info.out_color_space = JCS_RGB;
        info.scale_num = 1;
        info.scale_denom = (unsigned int)denominator;
        jpeg_start_decompress(&info);
        unsigned int out_h = info.output_height, out_w = info.output_width;
        unsigned int first = (unsigned int)top / denominator;
        unsigned int start = (unsigned int)left / denominator;
        if (first >= out_h) first = out_h - 1;
        if (start >= out_w) start = out_w - 1;
        rows = ((unsigned int)height + denominator - 1) / denominator;
        cols = ((unsigned int)width + denominator - 1) / denominator;
        if (first + rows > out_h) rows = out_h - first;
        if (start + cols > out_w) cols = out_w - start;
        JDIMENSION x_offset = start, crop_width = cols;
        jpeg_crop_scanline(&info, &x_offset, &crop_width);
        if (first > 0) {
            jpeg_skip_scanlines(&info, first);
        }
        row = malloc((size_t)crop_width * 3);
        region = malloc((size_t)rows * cols * 3);
        if (row == NULL || region == NULL) {
            strcpy(state.message, "out of memory");
            failed = 1;
        } else {
            unsigned int shift = (start - x_offset) * 3;
            for (unsigned int r = 0; r < rows; r++) {
                JSAMPROW pointer = row;
                jpeg_read_scanlines(&info, &pointer, 1);
                memcpy(region + (size_t)r * cols * 3, row + shift, (size_t)cols * 3);
            }
        }
        jpeg_abort_decompress(&info); /* the rows below the crop are never decoded */
    }
    jpeg_destroy_decompress(&info);
    Py_END_ALLOW_THREADS

    PyBuffer_Release(&data);
    free(row);
    if (failed || state.warnings) {
        free(region);
        PyErr_Format(PyExc_ValueError, "undecodable JPEG: %s", state.message);
        return NULL;
    }
    PyObject *bytes = PyBytes_FromStringAndSize((const char *)region, (Py_ssize_t)rows * cols * 3);
    free(region);
    if (bytes == NULL) {
        return NULL;
    }
    return Py_BuildValue("(NII)", bytes, rows, cols);
}

static PyMethodDef methods[] = {
    {"decode_crop", decode_crop, METH_VARARGS,
     "decode_crop(data, top, left, height, width, denominator) -> (rgb bytes, rows, cols)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_roijpeg",
                                    "Region-of-interest JPEG decoding (libjpeg-turbo).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__roijpeg(void) { return PyModule_Create(&module); }
