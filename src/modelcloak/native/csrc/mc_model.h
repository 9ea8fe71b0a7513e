/* The interface between the fixed runtime (enclave.c) and one generated model (model.c).
 *
 * model.c is written by modelcloak.native at build time for exactly one split bundle: it holds the
 * private part's architecture as code, the facts of that bundle's header (its SHA-256, salt,
 * section layout, policy) and the READY payload the Python enclave would send; it holds no weight.
 * Weights arrive encrypted in LOAD, are decrypted into mc_plain and copied by mc_prepare() into
 * resident arrays. Every buffer is static: nothing is allocated after start.
 */
#ifndef MC_MODEL_H
#define MC_MODEL_H

#include <stddef.h>
#include <stdint.h>

#define MC_MAX_RANK 8

typedef struct {
    const char *name;
    int rank;                      /* per-sample rank: the batch axis is not counted */
    int64_t dims[MC_MAX_RANK];     /* per-sample dims */
    int64_t fixed_batch;           /* the model's own batch size, or -1 when dynamic */
    size_t sample_elems;           /* product of dims */
} mc_io;

extern const mc_io mc_inputs[];
extern const int mc_n_inputs;
extern const mc_io mc_outputs[];
extern const int mc_n_outputs;
extern const int mc_tile;                         /* samples per mc_run call at most */

extern const unsigned char mc_header_digest[32];  /* SHA-256 of the one bundle header accepted */
extern const unsigned char mc_key_id[8];          /* enclave key id that bundle was sealed for */
extern const unsigned char mc_salt[32];
extern const char mc_section_label[];             /* HKDF info: "modelcloak/v1/section/<name>" */
extern const uint32_t mc_section_index;
extern const uint64_t mc_section_size;
extern const uint64_t mc_chunk_size;

extern const unsigned char mc_ready_head[];       /* READY's specs and policy, encoded by protocol.py */
extern const size_t mc_ready_head_len;
extern const int mc_policy_mode;                  /* 1 label, 2 topk, 3 scores */
extern const uint32_t mc_policy_k;
extern const uint64_t mc_budget;                  /* UINT64_MAX: none */
extern const double mc_rate;                      /* samples per second; 0: none */

extern unsigned char mc_plain[];                  /* the decrypted section, wiped after mc_prepare */

int mc_prepare(void);                             /* 0 when the weights are in place */
void mc_wipe(void);                               /* zero every weight and activation */
float *mc_input(int index);
const float *mc_output(int index);
void mc_run(int samples);                         /* 1 <= samples <= mc_tile */

#endif
