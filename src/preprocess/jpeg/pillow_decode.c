/*
 * JPEG decoding through the libjpeg API of libjpeg-turbo, driven exactly as Pillow's
 * ImagingJpegDecode (src/libImaging/JpegDecode.c) and ImageFile.load drive it:
 *
 *  - a suspending source: when the data runs out, libjpeg suspends instead of inventing an
 *    end of image, so a file cut short is noticed ("image file is truncated");
 *  - the decoder's defaults (accurate integer IDCT, fancy upsampling), the colour space it
 *    guesses from the file, output as RGBX for three components, CMYK for four, L for one;
 *  - rows written into a zero-filled image as they come, one scanline at a time;
 *  - with `load_truncated` (Pillow's ImageFile.LOAD_TRUNCATED_IMAGES), an EOI marker appended
 *    once the file is exhausted (JpegImageFile.load_read), and whatever was decoded kept.
 *
 * Errors leave through longjmp, as in Pillow: no Rust frame lies between the setjmp here and
 * the libjpeg call that jumps, so nothing is skipped that would need unwinding.
 */
#include <setjmp.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jpeglib.h"

/* The caller's message buffer holds RS_JPEG_MESSAGE_LEN bytes. */
#define RS_JPEG_MESSAGE_LEN 256
_Static_assert(JMSG_LENGTH_MAX <= RS_JPEG_MESSAGE_LEN, "libjpeg messages fit the buffer");

/* Results of rs_pillow_jpeg_decode. */
#define RS_JPEG_DONE 0      /* every row decoded */
#define RS_JPEG_SUSPENDED 1 /* the data ended before the image did */
#define RS_JPEG_BROKEN 2    /* libjpeg raised an error */

typedef struct {
    struct jpeg_source_mgr pub;
    /* Bytes still to skip once more data arrives (a marker longer than the data). */
    long skip;
} source_mgr;

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf setjmp_buffer;
    char *message;
} error_mgr;

typedef struct {
    struct jpeg_decompress_struct cinfo;
    error_mgr error;
    source_mgr source;
    /* Pillow's codec state: 0 before setup, then 1..4 as in ImagingJpegDecode. */
    int state;
    /* The image Pillow allocated from the header it parsed: `components` bytes a pixel. */
    JDIMENSION xsize, ysize, y;
    int components;
    unsigned char *image;
    /* One decoded scanline, as libjpeg writes it (4 bytes a pixel for RGBX and CMYK). */
    unsigned char *row;
    int destroyed;
} decoder;

static void stub(j_decompress_ptr cinfo) { (void)cinfo; }

static boolean fill_input_buffer(j_decompress_ptr cinfo) {
    (void)cinfo;
    return FALSE; /* suspend */
}

static void skip_input_data(j_decompress_ptr cinfo, long num_bytes) {
    source_mgr *source = (source_mgr *)cinfo->src;
    if (num_bytes > (long)source->pub.bytes_in_buffer) {
        /* More than is here: remember the rest, which forces a suspension. */
        source->skip = num_bytes - (long)source->pub.bytes_in_buffer;
        source->pub.next_input_byte += source->pub.bytes_in_buffer;
        source->pub.bytes_in_buffer = 0;
    } else {
        source->pub.bytes_in_buffer -= num_bytes;
        source->pub.next_input_byte += num_bytes;
        source->skip = 0;
    }
}

static void error_exit(j_common_ptr cinfo) {
    error_mgr *error = (error_mgr *)cinfo->err;
    if (error->message) {
        (*cinfo->err->format_message)(cinfo, error->message);
    }
    longjmp(error->setjmp_buffer, 1);
}

static void output_message(j_common_ptr cinfo) { (void)cinfo; /* warnings are ignored */ }

/* Copies one decoded scanline into the image, as Pillow's unpackers do. */
static void shuffle(decoder *d) {
    unsigned char *out = d->image + (size_t)d->y * d->xsize * (size_t)d->components;
    const unsigned char *in = d->row;
    JDIMENSION x;
    switch (d->components) {
        case 1: /* "L" */
            memcpy(out, in, d->xsize);
            break;
        case 3: /* "RGBX" into an RGB image */
            for (x = 0; x < d->xsize; x++, in += 4, out += 3) {
                out[0] = in[0];
                out[1] = in[1];
                out[2] = in[2];
            }
            break;
        default: /* "CMYK;I": Adobe's inverted CMYK */
            for (x = 0; x < d->xsize * 4; x++) {
                out[x] = (unsigned char)~in[x];
            }
            break;
    }
}

static void destroy(decoder *d) {
    if (!d->destroyed) {
        jpeg_destroy_decompress(&d->cinfo);
        d->destroyed = 1;
    }
}

/*
 * ImagingJpegDecode: feeds `len` bytes at `buf`. Returns the bytes consumed (>= 0) when
 * libjpeg suspended for more data, or -1 when decoding ended: *broken says whether by an error.
 */
static long decode_step(decoder *d, const unsigned char *buf, size_t len, int *broken,
                        size_t max_memory) {
    int ok;
    *broken = 0;

    if (setjmp(d->error.setjmp_buffer)) {
        destroy(d);
        *broken = 1;
        return -1;
    }

    if (!d->state) {
        d->cinfo.err = jpeg_std_error(&d->error.pub);
        d->error.pub.error_exit = error_exit;
        d->error.pub.output_message = output_message;
        jpeg_create_decompress(&d->cinfo);
        /* A bound on libjpeg's own memory (coefficient buffers of multi-scan files). */
        d->cinfo.mem->max_memory_to_use = (long)max_memory;
        d->cinfo.src = &d->source.pub;
        d->source.pub.init_source = stub;
        d->source.pub.fill_input_buffer = fill_input_buffer;
        d->source.pub.skip_input_data = skip_input_data;
        d->source.pub.resync_to_restart = jpeg_resync_to_restart;
        d->source.pub.term_source = stub;
        d->source.pub.bytes_in_buffer = 0;
        d->source.skip = 0;
        d->state = 1;
    }

    d->source.pub.next_input_byte = buf;
    d->source.pub.bytes_in_buffer = len;

    if (d->source.skip > 0) {
        skip_input_data(&d->cinfo, d->source.skip);
        if (d->source.skip > 0) {
            return (long)(d->source.pub.next_input_byte - buf);
        }
    }

    switch (d->state) {
        case 1:
            do {
                ok = jpeg_read_header(&d->cinfo, FALSE);
            } while (ok == JPEG_HEADER_TABLES_ONLY);
            if (ok == JPEG_SUSPENDED) {
                break;
            }
            /* Pillow's header parser and libjpeg read the same frame header; should they
               ever disagree, the rows below would not fit the image. */
            if (d->cinfo.image_width != d->xsize || d->cinfo.image_height != d->ysize ||
                d->cinfo.num_components != d->components) {
                if (d->error.message) {
                    snprintf(d->error.message, JMSG_LENGTH_MAX,
                             "the frame header read by the decoder (%ux%u, %d components) "
                             "differs from the one found first",
                             (unsigned)d->cinfo.image_width, (unsigned)d->cinfo.image_height,
                             d->cinfo.num_components);
                }
                destroy(d);
                *broken = 1;
                return -1;
            }
            switch (d->components) {
                case 1:
                    d->cinfo.out_color_space = JCS_GRAYSCALE;
                    break;
                case 3:
                    d->cinfo.out_color_space = JCS_EXT_RGBX;
                    break;
                default:
                    d->cinfo.out_color_space = JCS_CMYK;
                    break;
            }
            d->state++;
            /* fall through */

        case 2:
            if (!jpeg_start_decompress(&d->cinfo)) {
                break;
            }
            if (d->cinfo.output_width != d->xsize ||
                d->cinfo.output_components != (d->components == 1 ? 1 : 4)) {
                if (d->error.message) {
                    snprintf(d->error.message, JMSG_LENGTH_MAX,
                             "unexpected decoder output (%u pixels, %d components a row)",
                             (unsigned)d->cinfo.output_width, d->cinfo.output_components);
                }
                destroy(d);
                *broken = 1;
                return -1;
            }
            d->row = (*d->cinfo.mem->alloc_small)(
                (j_common_ptr)&d->cinfo, JPOOL_IMAGE,
                (size_t)d->cinfo.output_width * (size_t)d->cinfo.output_components);
            d->state++;
            /* fall through */

        case 3:
            ok = 1;
            while (d->y < d->ysize) {
                JSAMPROW rows[1];
                rows[0] = d->row;
                ok = (int)jpeg_read_scanlines(&d->cinfo, rows, 1);
                if (ok != 1) {
                    break;
                }
                shuffle(d);
                d->y++;
            }
            if (ok != 1) {
                break;
            }
            d->state++;
            /* fall through */

        case 4:
            if (!jpeg_finish_decompress(&d->cinfo)) {
                /* The end marker may be missing: every row is there, which is enough. */
                if (d->y < d->ysize) {
                    break;
                }
            }
            destroy(d);
            return -1;
    }

    return (long)(d->source.pub.next_input_byte - buf);
}

/*
 * Decodes the whole JPEG file `data` into `image` (zero-filled by the caller, `width * height
 * * components` bytes; CMYK as Pillow stores it, already un-inverted), the way
 * ImageFile.load feeds Pillow's decoder. Returns RS_JPEG_*; `*rows` is the number of rows
 * written, `*unprocessed` the bytes left over when the data ended first, and `message`
 * (RS_JPEG_MESSAGE_LEN bytes) libjpeg's error for RS_JPEG_BROKEN.
 */
int rs_pillow_jpeg_decode(const unsigned char *data, size_t len, unsigned width,
                          unsigned height, int components, int load_truncated,
                          size_t max_memory, unsigned char *image, unsigned *rows,
                          size_t *unprocessed, char *message) {
    /* Static storage would not be thread-safe, and the jmp_buf must outlive decode_step's
       frames only, so the state lives on the heap for the duration of this call. */
    decoder *d = calloc(1, sizeof(decoder));
    unsigned char *tail = NULL;
    long consumed;
    int broken = 0;
    int result;

    *rows = 0;
    *unprocessed = 0;
    if (message) {
        message[0] = '\0';
    }
    if (!d) {
        if (message) {
            snprintf(message, JMSG_LENGTH_MAX, "out of memory");
        }
        return RS_JPEG_BROKEN;
    }
    d->xsize = width;
    d->ysize = height;
    d->components = components;
    d->image = image;
    d->error.message = message;

    /* ImageFile.load: the whole file, then, once it is exhausted, either the error or (with
       LOAD_TRUNCATED_IMAGES) the unconsumed bytes again followed by an EOI marker. */
    consumed = decode_step(d, data, len, &broken, max_memory);
    if (consumed >= 0 && load_truncated) {
        size_t left = len - (size_t)consumed;
        tail = malloc(left + 2);
        if (!tail) {
            destroy(d);
            if (message) {
                snprintf(message, JMSG_LENGTH_MAX, "out of memory");
            }
            free(d);
            return RS_JPEG_BROKEN;
        }
        if (left) {
            memcpy(tail, data + consumed, left);
        }
        tail[left] = 0xFF;
        tail[left + 1] = 0xD9;
        consumed = decode_step(d, tail, left + 2, &broken, max_memory);
        if (consumed >= 0) {
            *unprocessed = left + 2 - (size_t)consumed;
        }
    } else if (consumed >= 0) {
        *unprocessed = len - (size_t)consumed;
    }

    if (consumed < 0) {
        result = broken ? RS_JPEG_BROKEN : RS_JPEG_DONE;
    } else {
        result = RS_JPEG_SUSPENDED;
    }
    *rows = d->y;
    destroy(d);
    free(tail);
    free(d);
    return result;
}
