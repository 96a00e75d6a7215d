/*
 * cli.h - what the commands of the `sdx4` program share.
 *
 * Each command (upscale, info, make-model, bench) is a function with the
 * shape of main() that receives the arguments from its own name on
 * (argv[0] is "upscale"). It declares its options as a table of
 * cli_option and lets cli_parse() fill them in; cli_parse() is strict
 * about numbers so that "--steps 7x" or "--guidance nan" is an error and
 * not a silently different run.
 *
 * Exit statuses: 0 success, 1 runtime failure ("sdx4: <message>" on
 * stderr), 2 bad usage (a message naming the option), 130 canceled by
 * Ctrl-C (the shell's 128 + SIGINT).
 */
#ifndef SDX4_CLI_H
#define SDX4_CLI_H

#include <stdint.h>

#include "sdx4.h"

#if defined(__GNUC__)
#define CLI_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define CLI_PRINTF(a, b)
#endif

/* EXIT_FLAGGED: the content check (--safety-checker) refused the output. */
enum { EXIT_RUNTIME = 1, EXIT_USAGE = 2, EXIT_FLAGGED = 3, EXIT_CANCELED = 130 };

typedef enum {
    OPT_FLAG,   /* int *: set to 1, takes no value */
    OPT_STRING, /* const char **: a non-empty string (a path, a name) */
    OPT_TEXT,   /* const char **: any string, "" included (a prompt) */
    OPT_CHOICE, /* const char **: one of `choices` ("cpu|cuda|auto") */
    OPT_INT,    /* int *: decimal integer in [min, max] */
    OPT_FLOAT,  /* double *: finite number in [min, max] */
    OPT_SEED,   /* uint64_t *: decimal integer in [0, SDX4_SEED_MAX] */
    OPT_LIST,   /* cli_list *: every value of a repeatable option, in order */
} cli_option_kind;

/* The values of an OPT_LIST option; more than CLI_LIST_MAX is a usage
 * error. */
#define CLI_LIST_MAX 32
typedef struct {
    const char *items[CLI_LIST_MAX];
    int count;
} cli_list;

typedef struct {
    const char *name; /* "--steps" */
    cli_option_kind kind;
    void *value;      /* where the parsed value goes (type by kind) */
    double min, max;  /* OPT_INT, OPT_FLOAT: inclusive range */
    const char *choices;
    int given;        /* set by cli_parse when the option appears */
} cli_option;

typedef struct {
    const char *name;        /* "upscale" */
    const char *help;        /* the whole --help text */
    const char *positionals; /* "IN OUT", for the "expected" message */
    int min_positionals, max_positionals;
    cli_option *options;     /* terminated by an entry with name NULL */
} cli_command;

/* cli_parse() returns this when the command should go on. */
#define CLI_CONTINUE (-1)

/* Parses argv[1..argc-1]: options ("--name value" or "--name=value")
 * anywhere among the positional arguments, "--" ending the options.
 * Stores the positional arguments in `positionals` (room for
 * cmd->max_positionals) and their count in *npositionals. Returns
 * CLI_CONTINUE, or the exit status the command must return at once: 0
 * after printing --help, EXIT_USAGE after printing what is wrong. */
int cli_parse(cli_command *cmd, int argc, char **argv,
              const char **positionals, int *npositionals);

/* Whether option `name` appeared on the command line. */
int cli_given(const cli_command *cmd, const char *name);

/* Prints "sdx4 <cmd>: <message>" and a hint to stderr; returns EXIT_USAGE. */
int cli_usage_error(const cli_command *cmd, const char *fmt, ...)
    CLI_PRINTF(2, 3);

/* Prints "sdx4: <message>" to stderr; returns EXIT_RUNTIME. */
int cli_fail(const char *fmt, ...) CLI_PRINTF(1, 2);

/* Prints "sdx4: <sdx4_last_error()>"; returns EXIT_RUNTIME. */
int cli_fail_engine(void);

/* The model folder: --model when given, else $SDX4_MODEL, else NULL. */
const char *cli_model_dir(const char *option_value);

/* The CUDA backend's settings (sdx4.h's sdx4_cuda_options) in the option
 * tables of upscale and bench: --cuda-dtype, --cuda-vae, --cuda-conv and
 * --plan-cache, and their lines of --help. */
#define CLI_CUDA_DTYPES "fp16|fp32"
#define CLI_CUDA_VAES "bf16|fp32"
#define CLI_CUDA_CONVS "cudnn|cudnn-legacy|cudnn-graph|im2col"
#define CLI_CUDA_OPTIONS(cuda)                                                 \
    {"--cuda-dtype", OPT_CHOICE, &(cuda)->dtype, 0, 0, CLI_CUDA_DTYPES, 0},    \
    {"--cuda-vae", OPT_CHOICE, &(cuda)->vae, 0, 0, CLI_CUDA_VAES, 0},          \
    {"--cuda-conv", OPT_CHOICE, &(cuda)->conv, 0, 0, CLI_CUDA_CONVS, 0},       \
    {"--plan-cache", OPT_STRING, &(cuda)->plan_cache, 0, 0, 0, 0}
#define CLI_CUDA_HELP                                                          \
    "  --cuda-dtype fp16|fp32 CUDA: half weights and activations (default),\n" \
    "                         or float everywhere ($SDX4_CUDA_DTYPE)\n"        \
    "  --cuda-vae bf16|fp32   CUDA: the VAE decode of fp16 mode in bfloat16\n" \
    "                         (default) or float ($SDX4_CUDA_VAE)\n"           \
    "  --cuda-conv NAME       CUDA convolutions: cudnn (default),\n"           \
    "                         cudnn-legacy, cudnn-graph or im2col\n"           \
    "                         ($SDX4_CUDA_CONV)\n"                             \
    "  --plan-cache FILE|off  CUDA: where the algorithms chosen per size are\n" \
    "                         kept for the next run ($SDX4_PLAN_CACHE; default\n" \
    "                         $XDG_CACHE_HOME/sdx4/cuda-plans, else\n"         \
    "                         ~/.cache/sdx4/cuda-plans)\n"                     \
    "  SDX4_CUDA_GRAPH=0      CUDA: every step operation by operation\n"       \
    "  SDX4_CUDA_PLAN=0       CUDA: no planned memory arena for the steps\n"   \
    "  SDX4_CUDA_PROFILE=1    CUDA: GPU time per operation, on stderr\n"

/* Fills the CUDA settings that no flag gave from the SDX4_CUDA_* variables
 * (flags win, as in `sdx4 serve`). Returns CLI_CONTINUE, or EXIT_USAGE
 * after naming a variable whose value is not one of its choices. */
int cli_cuda_environment(const cli_command *cmd, sdx4_cuda_options *cuda);

/* The precision flags of upscale and bench beside the CUDA ones:
 * --cpu-dtype fp32|bf16 (sdx4.h's sdx4_cpu_options, $SDX4_CPU_DTYPE), and
 * --dtype, the one flag for either device: fp32 sets both to float, bf16
 * the CPU's (refused with --device cuda), fp16 CUDA's (refused with
 * --device cpu); with --device auto the device that opens takes the part
 * that is its own and the other its default. --dtype with --cpu-dtype or
 * --cuda-dtype is a usage error. */
#define CLI_CPU_DTYPES "fp32|bf16"
#define CLI_DTYPES "fp32|fp16|bf16"
typedef struct {
    const char *dtype; /* --dtype */
    sdx4_cpu_options cpu;
} cli_precision;
#define CLI_PRECISION_OPTIONS(p)                                                   \
    {"--dtype", OPT_CHOICE, &(p)->dtype, 0, 0, CLI_DTYPES, 0},                     \
    {"--cpu-dtype", OPT_CHOICE, &(p)->cpu.dtype, 0, 0, CLI_CPU_DTYPES, 0}
#define CLI_PRECISION_HELP                                                         \
    "  --dtype fp32|fp16|bf16 the device's precision: fp32 float everywhere,\n"    \
    "                         fp16 CUDA's half, bf16 the CPU's bfloat16\n"         \
    "  --cpu-dtype fp32|bf16  CPU: float32 (default), or convolutions and\n"      \
    "                         linear layers in bfloat16 through oneDNN (AMX\n"    \
    "                         or AVX512-BF16; refused elsewhere)\n"              \
    "                         ($SDX4_CPU_DTYPE)\n"

/* Maps --dtype onto cuda and p->cpu for `device`, then fills cpu.dtype from
 * $SDX4_CPU_DTYPE when no flag gave it. Call before
 * cli_cuda_environment(). Returns CLI_CONTINUE, or EXIT_USAGE after naming
 * the flag or variable at fault. */
int cli_precision_settings(const cli_command *cmd, cli_precision *p, const char *device,
                           sdx4_cuda_options *cuda);

/* Seconds on a monotonic clock. */
double cli_now(void);

/* --scheduler-option key=value, repeated, as the JSON object of
 * scheduler_options (malloc'd; NULL when none was given or one is bad,
 * which *bad tells, after a usage error). */
char *cli_scheduler_options(const cli_command *cmd, const cli_list *list, int *bad);

int cmd_upscale(int argc, char **argv);
int cmd_info(int argc, char **argv);
int cmd_compare(int argc, char **argv); /* needs imageio */
int cmd_convert(int argc, char **argv);
int cmd_make_model(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_worker(int argc, char **argv); /* cluster mode's inference process (needs the server) */

#endif
