/* What propd's AMX kernels share: every tile register as 16 rows of 64 bytes (16 fp32 sums, or 32
   bf16 inputs, a row), the shape all of matmul.c's and attention_amx.c's products use. */
#ifndef PROPD_TILES_H
#define PROPD_TILES_H
#include <immintrin.h>
#include <stdint.h>

/* This thread's tile registers, all eight 16 x 64 bytes (release them with _tile_release). */
static inline void configure_tiles(void) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t bytes_per_row[16];
        uint8_t rows[16];
    } config = {.palette = 1};
    for (int t = 0; t < 8; ++t) config.bytes_per_row[t] = 64, config.rows[t] = 16;
    _tile_loadconfig(&config);
}

#endif
