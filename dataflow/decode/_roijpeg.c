/*
 * Region-of-interest JPEG decoding with libjpeg-turbo: decode only the crop.
 *
 * decode_crop_into(out, data, top, left, height, width, denominator)
 *     -> (rows, cols, stride, shift)
 *
 * The image is decoded at 1/denominator DCT scale; rows above the crop are skipped
 * (jpeg_skip_scanlines: entropy-decoded but never inverse-transformed, upsampled or
 * colour-converted), columns outside it are cut at iMCU boundaries (jpeg_crop_scanline),
 * and decoding stops after the crop's last row (rows below are never even entropy-decoded).
 * A random-resized crop of half the image thus costs about 60 % of a full decode.
 * The crop is given in full-resolution pixels; the result is the RGB crop at the scaled
 * resolution, rows × cols. Runs without the GIL. Corrupt data (a libjpeg warning) or a fatal
 * error raises ValueError with libjpeg's message.
 *
 * The scanlines go straight into ``out`` (a writable buffer the caller keeps, e.g. one per
 * thread): rows of ``stride`` pixels, the crop starting ``shift`` pixels in, so the crop is
 * out[:rows*stride*3] seen as rows × stride × 3, columns shift:shift+cols. No allocation, no
 * copy: returning a fresh ~0.5 MB bytes object per image cost page faults and two copies.
 * ``out`` needs rows × (cols + 32) × 3 bytes at most (the row is widened to the iMCU
 * boundary on the left); a smaller one raises ValueError before anything is written.
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

/* Decode the crop into ``out`` (``capacity`` bytes), rows ``*stride`` pixels apart. Called
 * without the GIL. Returns 0, or 1 with ``state->message`` set. */
static int decode(const unsigned char *data, size_t size, int top, int left, int height,
                  int width, int denominator, unsigned char *out, size_t capacity,
                  struct error_state *state, unsigned int *rows_out, unsigned int *cols_out,
                  unsigned int *stride_out, unsigned int *shift_out) {
    struct jpeg_decompress_struct info;
    JSAMPROW *volatile pointers = NULL;
    volatile int failed = 0;
    volatile unsigned int rows = 0, cols = 0, stride = 0, shift = 0;
    info.err = jpeg_std_error(&state->manager);
    state->manager.error_exit = on_error;
    state->manager.emit_message = on_message;
    if (setjmp(state->jump)) {
        failed = 1;
    } else {
        jpeg_create_decompress(&info);
        jpeg_mem_src(&info, data, (unsigned long)size);
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
        stride = crop_width;
        shift = start - x_offset;
        if ((size_t)rows * stride * 3 > capacity) {
            strcpy(state->message, "the output buffer is too small for the crop");
            failed = 1;
        } else if ((pointers = malloc(sizeof(JSAMPROW) * rows)) == NULL) {
            strcpy(state->message, "out of memory");
            failed = 1;
        } else {
            if (first > 0) {
                jpeg_skip_scanlines(&info, first);
            }
            for (unsigned int r = 0; r < rows; r++) {
                pointers[r] = out + (size_t)r * stride * 3;
            }
            unsigned int done = 0;
            while (done < rows) {
                JDIMENSION got = jpeg_read_scanlines(&info, pointers + done, rows - done);
                if (got == 0) break; /* suspension: cannot happen with a memory source */
                done += got;
            }
        }
        jpeg_abort_decompress(&info); /* the rows below the crop are never decoded */
    }
    jpeg_destroy_decompress(&info);
    free(pointers);
    if (failed || state->warnings) {
        return 1;
    }
    *rows_out = rows;
    *cols_out = cols;
    *stride_out = stride;
    *shift_out = shift;
    return 0;
}

static int check_box(int top, int left, int height, int width, int denominator) {
    if (top < 0 || left < 0 || height < 1 || width < 1 ||
        (denominator != 1 && denominator != 2 && denominator != 4 && denominator != 8)) {
        PyErr_SetString(PyExc_ValueError, "bad crop box or DCT scale denominator");
        return 0;
    }
    return 1;
}

static PyObject *decode_crop_into(PyObject *self, PyObject *args) {
    Py_buffer out, data;
    int top, left, height, width, denominator, failed;
    if (!PyArg_ParseTuple(args, "w*y*iiiii", &out, &data, &top, &left, &height, &width,
                          &denominator)) {
        return NULL;
    }
    if (!check_box(top, left, height, width, denominator)) {
        PyBuffer_Release(&out);
        PyBuffer_Release(&data);
        return NULL;
    }
    struct error_state state;
    unsigned int rows = 0, cols = 0, stride = 0, shift = 0;
    memset(&state, 0, sizeof(state));
    Py_BEGIN_ALLOW_THREADS
    failed = decode((const unsigned char *)data.buf, (size_t)data.len, top, left, height, width,
                    denominator, (unsigned char *)out.buf, (size_t)out.len, &state, &rows,
                    &cols, &stride, &shift);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&out);
    PyBuffer_Release(&data);
    if (failed) {
        PyErr_Format(PyExc_ValueError, "undecodable JPEG: %s", state.message);
        return NULL;
    }
    return Py_BuildValue("(IIII)", rows, cols, stride, shift);
}

static PyMethodDef methods[] = {
    {"decode_crop_into", decode_crop_into, METH_VARARGS,
     "decode_crop_into(out, data, top, left, height, width, denominator)"
     " -> (rows, cols, stride, shift)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_roijpeg",
                                    "Region-of-interest JPEG decoding (libjpeg-turbo).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__roijpeg(void) { return PyModule_Create(&module); }
