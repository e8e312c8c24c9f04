/*
 * The decode side of the codecs (spec/FORMAT.md section 7) in one include: zstd frames
 * (zstdframe.h), index formats (index.h), value stages and quantized rows (decode.h).
 */
#ifndef NNP_CODEC_H
#define NNP_CODEC_H

#include "decode.h"

#endif
