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
 * A random-resized crop of half the image thus costs about 60 % of a full decode. When the
 * JPEG has a restart marker at every MCU row (add_row_restarts, below, writes them at
 * conversion), the rows above the crop are not even entropy-decoded: libjpeg is handed the
 * header and then the stream from the crop's MCU row on (see "Restart-marker splicing").
 * On the benchmark photos a crop of the bottom half goes from 455 to 339 µs; a random-
 * resized crop, whose top is 16 % down on average, from 406 to 392 µs. Pixels unchanged.
 * The crop is given in full-resolution pixels; the result is the RGB crop at the scaled
 * resolution, rows × cols. Runs without the GIL. Corrupt data (a libjpeg warning) or a fatal
 * error raises ValueError with libjpeg's message. CMYK and YCCK JPEGs (print workflows,
 * Photoshop) come out RGB too: libjpeg cannot convert them to RGB itself ("Unsupported color
 * conversion request"), so they are decoded to CMYK a row at a time and converted here, with
 * Pillow's formula on Adobe's inverted convention (see cmyk_row_to_rgb).
 *
 * The scanlines go straight into ``out`` (a writable buffer the caller keeps, e.g. one per
 * thread): rows of ``stride`` pixels, the crop starting ``shift`` pixels in, so the crop is
 * out[:rows*stride*3] seen as rows × stride × 3, columns shift:shift+cols. No allocation, no
 * copy: returning a fresh ~0.5 MB bytes object per image cost page faults and two copies.
 * ``out`` needs rows × (cols + 34) × 3 bytes at most (the row is widened by a column on
 * each side, then to the iMCU boundary on the left); a smaller one raises ValueError
 * before anything is written.
 *
 * add_row_restarts(data) -> bytes
 *
 * The same JPEG, losslessly, with a restart marker at every MCU row (see that section).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jpeglib.h>
#include <jerror.h>
#include <jpegint.h> /* struct jpeg_marker_reader: the restart number after a cut */

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

/* ---- Restart-marker splicing: start the entropy decoder at the crop's MCU row ----------
 *
 * A baseline JPEG with a restart marker at the start of every MCU row (conversion writes
 * them: add_row_restarts below) can be cut there: restart intervals are coded independently
 * (the DC predictors reset), so the header with the frame's height lowered by j MCU rows,
 * followed by the stream from MCU row j on, is a valid JPEG of the image's lower part once
 * the marker reader expects RST(j mod 8) first. Nothing is copied but the header (without
 * its EXIF, ICC and comment segments): a two-part source manager serves it, then the
 * caller's bytes. Decoding the crop from it never touches the rows above, not even their
 * Huffman codes. The cut is at the MCU row holding the pixel row above the crop: fancy
 * chroma upsampling of a row reads the chroma row above it, which the cut image's first
 * row lacks, so the crop never starts there and its pixels stay identical to a full
 * decode's. Anything unexpected (progressive or arithmetic coding, more than one scan,
 * restart intervals that do not start each row, a marker out of sequence, a segment running
 * past the end) means no cut: the whole stream goes to libjpeg as before, which reports real
 * damage itself. Every read below is bounds-checked against ``size``. */

struct layout {
    size_t height_at;               /* offset of the frame header's 2-byte height */
    size_t scan_at;                 /* first byte of the entropy-coded data */
    unsigned int height, mcu_height; /* image height; pixel rows per MCU row */
    unsigned int intervals_per_row; /* restart intervals in one MCU row */
};

/* 1 and *layout filled when ``data`` is a single-scan Huffman JPEG whose restart intervals
 * start every MCU row; 0 otherwise. */
static int read_layout(const unsigned char *data, size_t size, struct layout *layout) {
    unsigned int restart_interval = 0, components = 0, h_max = 1, v_max = 1, width = 0;
    int have_frame = 0;
    size_t at = 2;
    if (size < 4 || data[0] != 0xFF || data[1] != 0xD8) return 0;
    while (at + 4 <= size) {
        if (data[at] != 0xFF) return 0;
        unsigned int marker = data[at + 1];
        if (marker == 0xFF) { /* a fill byte before a marker */
            at++;
            continue;
        }
        size_t length = ((size_t)data[at + 2] << 8) | data[at + 3];
        if (length < 2 || at + 2 + length > size) return 0;
        const unsigned char *body = data + at + 4;
        size_t body_size = length - 2;
        if (marker == 0xC0 || marker == 0xC1) { /* baseline / extended sequential, Huffman */
            if (have_frame || body_size < 6 || body[0] != 8) return 0;
            layout->height_at = at + 5;
            layout->height = ((unsigned int)body[1] << 8) | body[2];
            width = ((unsigned int)body[3] << 8) | body[4];
            components = body[5];
            if (layout->height == 0 || width == 0 || components < 1 || components > 4 ||
                body_size < 6 + 3 * (size_t)components) {
                return 0;
            }
            for (unsigned int c = 0; c < components; c++) {
                unsigned int h = body[7 + 3 * c] >> 4, v = body[7 + 3 * c] & 15;
                if (h < 1 || h > 4 || v < 1 || v > 4) return 0;
                if (h > h_max) h_max = h;
                if (v > v_max) v_max = v;
            }
            have_frame = 1;
        } else if ((marker >= 0xC2 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 &&
                    marker != 0xCC) ||
                   marker == 0x01 || (marker >= 0xD0 && marker <= 0xD9)) {
            return 0; /* progressive, lossless, arithmetic; or a marker with no length here */
        } else if (marker == 0xDD) {
            if (body_size < 2) return 0;
            restart_interval = ((unsigned int)body[0] << 8) | body[1];
        } else if (marker == 0xDA) {
            if (!have_frame || body_size < 1 || body[0] != components) return 0;
            layout->scan_at = at + 2 + length;
            break;
        }
        at += 2 + length;
    }
    if (!have_frame || layout->scan_at == 0 || restart_interval == 0) return 0;
    /* One component: the scan is not interleaved and its MCU is a single 8 × 8 block. */
    unsigned int mcu_width = components == 1 ? 8 : 8 * h_max;
    layout->mcu_height = components == 1 ? 8 : 8 * v_max;
    unsigned int mcus_per_row = (width + mcu_width - 1) / mcu_width;
    if (mcus_per_row % restart_interval != 0) return 0;
    layout->intervals_per_row = mcus_per_row / restart_interval;
    return 1;
}

/* The offset in ``data`` of the restart interval that starts MCU row ``first``: just past
 * the restart marker that ends the interval before it. 0 when the markers are not there
 * in sequence (RST0, RST1, ... RST7, RST0, ...) before any other marker. */
static size_t find_row(const unsigned char *data, size_t size, const struct layout *layout,
                       unsigned int first) {
    size_t skip = (size_t)first * layout->intervals_per_row, found = 0, at = layout->scan_at;
    while (found < skip) {
        const unsigned char *next = memchr(data + at, 0xFF, size - at);
        if (next == NULL) return 0;
        at = (size_t)(next - data) + 1;
        while (at < size && data[at] == 0xFF) at++; /* fill bytes */
        if (at >= size) return 0;
        unsigned int marker = data[at++];
        if (marker == 0x00) continue; /* a stuffed 0xFF inside the coded data */
        if (marker < 0xD0 || marker > 0xD7 || (marker & 7) != (found & 7)) return 0;
        found++;
    }
    return at;
}

/* Copy into ``out`` the header segments a decoder needs (all but APP1-13, APP15 and COM:
 * EXIF, ICC and comments can be large), the frame's height lowered by ``first`` MCU rows.
 * Returns the length, or 0 when it would not fit in ``capacity``. */
static size_t copy_header(const unsigned char *data, const struct layout *layout,
                          unsigned int first, unsigned char *out, size_t capacity) {
    size_t at = 2, written = 2;
    memcpy(out, data, 2); /* SOI */
    while (at < layout->scan_at) { /* read_layout checked every segment up to the scan */
        if (data[at + 1] == 0xFF) {
            at++;
            continue;
        }
        unsigned int marker = data[at + 1];
        size_t length = 2 + (((size_t)data[at + 2] << 8) | data[at + 3]);
        int needed = !((marker >= 0xE1 && marker <= 0xED) || marker == 0xEF || marker == 0xFE);
        if (needed) {
            if (written + length > capacity) return 0;
            memcpy(out + written, data + at, length);
            if (at + 5 == layout->height_at) {
                unsigned int height = layout->height - first * layout->mcu_height;
                out[written + 5] = (unsigned char)(height >> 8);
                out[written + 6] = (unsigned char)(height & 0xFF);
            }
            written += length;
        }
        at += length;
    }
    return written;
}

/* A source of two parts: the copied header, then the caller's bytes from the cut on (not
 * copied). Like jpeg_mem_src, a read past the end gets a warning and an inserted EOI. */
struct two_part_source {
    struct jpeg_source_mgr manager;
    const unsigned char *rest;
    size_t rest_size;
    int served_rest;
};

static void source_start(j_decompress_ptr info) { (void)info; }

static boolean source_fill(j_decompress_ptr info) {
    static const JOCTET end_of_image[2] = {0xFF, JPEG_EOI};
    struct two_part_source *source = (struct two_part_source *)info->src;
    if (!source->served_rest) {
        source->served_rest = 1;
        source->manager.next_input_byte = source->rest;
        source->manager.bytes_in_buffer = source->rest_size;
    } else {
        info->err->msg_code = JWRN_JPEG_EOF;
        (*info->err->emit_message)((j_common_ptr)info, -1);
        source->manager.next_input_byte = end_of_image;
        source->manager.bytes_in_buffer = 2;
    }
    return TRUE;
}

static void source_skip(j_decompress_ptr info, long count) {
    struct jpeg_source_mgr *source = info->src;
    if (count <= 0) return;
    while ((size_t)count > source->bytes_in_buffer) {
        count -= (long)source->bytes_in_buffer;
        source_fill(info);
    }
    source->next_input_byte += count;
    source->bytes_in_buffer -= (size_t)count;
}

static void source_end(j_decompress_ptr info) { (void)info; }

/* One row of CMYK as libjpeg gives it to RGB, as Pillow converts it: Adobe's convention
 * (Photoshop's, and the one Pillow, OpenCV and TurboJPEG assume for every CMYK JPEG) stores
 * ink inverted, so a stored 255 is no ink. With c and k the stored values,
 * R = k - round((255 - c) * k / 255): Pillow's cmyk2rgb after its "CMYK;I" read, bit for
 * bit, so the loader's pixels equal Pillow's ``convert("RGB")``. */
static void cmyk_row_to_rgb(const unsigned char *cmyk, unsigned char *rgb, unsigned int pixels) {
    for (unsigned int x = 0; x < pixels; x++, cmyk += 4, rgb += 3) {
        unsigned int k = cmyk[3];
        for (int channel = 0; channel < 3; channel++) {
            unsigned int product = (255u - cmyk[channel]) * k + 128u; /* round(a * b / 255) */
            rgb[channel] = (unsigned char)(k - (((product >> 8) + product) >> 8));
        }
    }
}

/* libjpeg's standard error manager, with errors jumping to ``state->jump`` and warnings
 * counted (a warning means damaged data: the callers fail on it). */
static struct jpeg_error_mgr *error_manager(struct error_state *state) {
    struct jpeg_error_mgr *manager = jpeg_std_error(&state->manager);
    manager->error_exit = on_error;
    manager->emit_message = on_message;
    return manager;
}

/* Decode the crop into ``out`` (``capacity`` bytes), rows ``*stride`` pixels apart. Called
 * without the GIL. Returns 0, or 1 with ``state->message`` set. */
static int decode(const unsigned char *data, size_t size, int top, int left, int height,
                  int width, int denominator, unsigned char *out, size_t capacity,
                  struct error_state *state, unsigned int *rows_out, unsigned int *cols_out,
                  unsigned int *stride_out, unsigned int *shift_out) {
    struct jpeg_decompress_struct info;
    JSAMPROW *volatile pointers = NULL;
    JSAMPROW volatile cmyk_row = NULL; /* CMYK and YCCK JPEGs: one row before conversion */
    volatile int failed = 0;
    volatile unsigned int rows = 0, cols = 0, stride = 0, shift = 0;
    struct layout layout;
    struct two_part_source source;
    unsigned char header[8192];
    size_t header_size = 0, rest_at = 0;
    unsigned int first = 0;
    memset(&layout, 0, sizeof(layout));
    /* Cut at the MCU row holding the pixel row above the crop: the crop never starts on the
     * cut image's first row, the only one whose chroma upsampling would lack its context. */
    if (top > 8 && read_layout(data, size, &layout) && (unsigned int)top < layout.height &&
        (first = (unsigned int)(top - 1) / layout.mcu_height) >= 1 &&
        (rest_at = find_row(data, size, &layout, first)) > 0 &&
        (header_size = copy_header(data, &layout, first, header, sizeof(header))) > 0) {
        top -= (int)(first * layout.mcu_height);
    } else {
        header_size = 0;
    }
    info.err = error_manager(state);
    if (setjmp(state->jump)) {
        failed = 1;
    } else {
        jpeg_create_decompress(&info);
        if (header_size > 0) {
            memset(&source, 0, sizeof(source));
            source.manager.next_input_byte = header;
            source.manager.bytes_in_buffer = header_size;
            source.manager.init_source = source_start;
            source.manager.fill_input_buffer = source_fill;
            source.manager.skip_input_data = source_skip;
            source.manager.resync_to_restart = jpeg_resync_to_restart;
            source.manager.term_source = source_end;
            source.rest = data + rest_at;
            source.rest_size = size - rest_at;
            info.src = &source.manager;
        } else {
            jpeg_mem_src(&info, data, (unsigned long)size);
        }
        jpeg_read_header(&info, TRUE);
        if (header_size > 0) {
            /* The first interval after the cut ends in RST(k mod 8), k the intervals cut;
             * the marker reader (jpegint.h) expects RST0 after a scan header. */
            info.marker->next_restart_num = (int)((first * layout.intervals_per_row) & 7);
        }
        int ink = info.jpeg_color_space == JCS_CMYK || info.jpeg_color_space == JCS_YCCK;
        info.out_color_space = ink ? JCS_CMYK : JCS_RGB;
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
        /* A column more than asked on each side where the image has them: libjpeg treats
         * the edges of the cropped region as the image's edges, and fancy 4:2:2 upsampling of
         * an edge column would take its own chroma sample for its neighbour's. */
        unsigned int wider = start > 0 ? 1 : 0;
        JDIMENSION x_offset = start - wider, crop_width = cols + wider;
        if (start + cols < out_w) crop_width++;
        jpeg_crop_scanline(&info, &x_offset, &crop_width);
        stride = crop_width;
        shift = start - x_offset;
        if ((size_t)rows * stride * 3 > capacity) {
            strcpy(state->message, "the output buffer is too small for the crop");
            failed = 1;
        } else if ((pointers = malloc(sizeof(JSAMPROW) * rows)) == NULL ||
                   (ink && (cmyk_row = malloc((size_t)stride * 4)) == NULL)) {
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
                if (ink) {
                    JSAMPROW row = cmyk_row;
                    if (jpeg_read_scanlines(&info, &row, 1) == 0) break;
                    cmyk_row_to_rgb(cmyk_row, pointers[done], stride);
                    done++;
                    continue;
                }
                JDIMENSION got = jpeg_read_scanlines(&info, pointers + done, rows - done);
                if (got == 0) break; /* suspension: cannot happen with a memory source */
                done += got;
            }
        }
        jpeg_abort_decompress(&info); /* the rows below the crop are never decoded */
    }
    jpeg_destroy_decompress(&info);
    free(pointers);
    free(cmyk_row);
    if (failed || state->warnings) {
        return 1;
    }
    *rows_out = rows;
    *cols_out = cols;
    *stride_out = stride;
    *shift_out = shift;
    return 0;
}

/* ---- Conversion: add a restart marker at every MCU row, losslessly ----------------------
 *
 * The DCT coefficients are copied, not decoded and re-encoded (what ``jpegtran -restart 1
 * -optimize -copy all`` does): the same quantised coefficients and tables, so every decoder
 * gives the same pixels. Huffman tables are re-optimised for the image, which pays for the
 * markers: measured on the benchmark's photos, the files come out a little smaller. APPn and
 * COM segments (EXIF, ICC profiles, comments) are kept; a progressive source comes out
 * baseline. */

struct growing_destination {
    struct jpeg_destination_mgr manager;
    unsigned char *buffer;
    size_t capacity;
};

static void destination_start(j_compress_ptr info) {
    struct growing_destination *destination = (struct growing_destination *)info->dest;
    destination->manager.next_output_byte = destination->buffer;
    destination->manager.free_in_buffer = destination->capacity;
}

static boolean destination_grow(j_compress_ptr info) {
    struct growing_destination *destination = (struct growing_destination *)info->dest;
    size_t capacity = destination->capacity * 2;
    unsigned char *buffer = realloc(destination->buffer, capacity);
    if (buffer == NULL) {
        info->err->msg_code = JERR_OUT_OF_MEMORY;
        (*info->err->error_exit)((j_common_ptr)info);
    }
    destination->manager.next_output_byte = buffer + destination->capacity;
    destination->manager.free_in_buffer = capacity - destination->capacity;
    destination->buffer = buffer;
    destination->capacity = capacity;
    return TRUE;
}

static void destination_end(j_compress_ptr info) { (void)info; }

/* ``length`` bytes of ``name``: "JFIF" with its NUL, "Adobe" without (a version follows) */
static int is_app_segment(jpeg_saved_marker_ptr marker, int app, const char *name,
                          size_t length) {
    return marker->marker == JPEG_APP0 + app && marker->data_length >= length &&
           memcmp(marker->data, name, length) == 0;
}

/* Transcode ``data``; 0 with destination->buffer holding ``*written`` bytes, or 1 with
 * ``state->message`` set (a warning counts: the input is damaged). Called without the GIL. */
static int add_restarts(const unsigned char *data, size_t size,
                        struct growing_destination *destination, size_t *written,
                        struct error_state *state) {
    struct jpeg_decompress_struct source;
    struct jpeg_compress_struct target;
    volatile int failed = 0;
    memset(&source, 0, sizeof(source));
    memset(&target, 0, sizeof(target));
    source.err = target.err = error_manager(state);
    if (setjmp(state->jump)) {
        failed = 1;
    } else {
        jpeg_create_decompress(&source);
        jpeg_create_compress(&target);
        jpeg_mem_src(&source, data, (unsigned long)size);
        jpeg_save_markers(&source, JPEG_COM, 0xFFFF);
        for (int app = 0; app < 16; app++) {
            jpeg_save_markers(&source, JPEG_APP0 + app, 0xFFFF);
        }
        jpeg_read_header(&source, TRUE);
        jvirt_barray_ptr *coefficients = jpeg_read_coefficients(&source);
        jpeg_copy_critical_parameters(&source, &target);
        target.optimize_coding = TRUE;
        target.restart_in_rows = 1;
        target.dest = &destination->manager;
        destination->manager.init_destination = destination_start;
        destination->manager.empty_output_buffer = destination_grow;
        destination->manager.term_destination = destination_end;
        jpeg_write_coefficients(&target, coefficients);
        for (jpeg_saved_marker_ptr marker = source.marker_list; marker; marker = marker->next) {
            /* the encoder already wrote its own JFIF or Adobe segment from the same fields */
            if ((target.write_JFIF_header && is_app_segment(marker, 0, "JFIF", 5)) ||
                (target.write_Adobe_marker && is_app_segment(marker, 14, "Adobe", 5))) {
                continue;
            }
            jpeg_write_marker(&target, marker->marker, marker->data, marker->data_length);
        }
        jpeg_finish_compress(&target);
        jpeg_finish_decompress(&source);
        *written = destination->capacity - destination->manager.free_in_buffer;
    }
    jpeg_destroy_compress(&target);
    jpeg_destroy_decompress(&source);
    return failed || state->warnings;
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

static PyObject *add_row_restarts(PyObject *self, PyObject *args) {
    Py_buffer data;
    struct layout layout;
    if (!PyArg_ParseTuple(args, "y*", &data)) {
        return NULL;
    }
    memset(&layout, 0, sizeof(layout));
    if (read_layout((const unsigned char *)data.buf, (size_t)data.len, &layout)) {
        PyObject *same = PyBytes_FromStringAndSize(data.buf, data.len); /* already cut-able */
        PyBuffer_Release(&data);
        return same;
    }
    struct error_state state;
    struct growing_destination destination;
    size_t written = 0;
    int failed = 1;
    memset(&state, 0, sizeof(state));
    memset(&destination, 0, sizeof(destination));
    destination.capacity = (size_t)data.len + 4096;
    destination.buffer = malloc(destination.capacity);
    if (destination.buffer == NULL) {
        strcpy(state.message, "out of memory");
    } else {
        Py_BEGIN_ALLOW_THREADS
        failed = add_restarts((const unsigned char *)data.buf, (size_t)data.len, &destination,
                              &written, &state);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&data);
    PyObject *result = NULL;
    if (failed) {
        PyErr_Format(PyExc_ValueError, "undecodable JPEG: %s", state.message);
    } else {
        result = PyBytes_FromStringAndSize((const char *)destination.buffer, (Py_ssize_t)written);
    }
    free(destination.buffer);
    return result;
}

static PyMethodDef methods[] = {
    {"add_row_restarts", add_row_restarts, METH_VARARGS,
     "add_row_restarts(data) -> bytes: the same JPEG, losslessly, with a restart marker at"
     " every MCU row (unchanged if it has them)"},
    {"decode_crop_into", decode_crop_into, METH_VARARGS,
     "decode_crop_into(out, data, top, left, height, width, denominator)"
     " -> (rows, cols, stride, shift)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_roijpeg",
                                    "Region-of-interest JPEG decoding (libjpeg-turbo).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__roijpeg(void) { return PyModule_Create(&module); }
