/*
 * args.c - option parsing and error reporting shared by the commands.
 *
 * A command describes its options in a table (cli.h) and cli_parse()
 * walks argv once: an argument starting with "--" is looked up in the
 * table, its value is the rest after '=' or the next argument, and is
 * converted according to the option's kind; anything else is positional.
 *
 * Numbers are parsed strictly: the whole string must be the number (no
 * leading blanks, no trailing characters), it must fit its type, floats
 * must be finite (strtod accepts "nan" and "inf"; we do not), and it must
 * lie in the option's range. Every message names the option, so that in
 * a long command line the user sees which value was refused.
 *
 * The CUDA settings of upscale and bench also come from SDX4_CUDA_*
 * variables where no flag gives them (the engine reads no environment):
 * a bad value is refused naming the variable, before any model loads.
 */
#include <ctype.h>
#include <jansson.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "cli.h"
#include "sdx4.h"

int cli_usage_error(const cli_command *cmd, const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "sdx4 %s: ", cmd->name);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\nRun 'sdx4 %s --help' for usage.\n", cmd->name);
    return EXIT_USAGE;
}

int cli_fail(const char *fmt, ...) {
    va_list ap;
    fputs("sdx4: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    return EXIT_RUNTIME;
}

int cli_fail_engine(void) {
    const char *message = sdx4_last_error();
    return cli_fail("%s", *message ? message : "unknown error");
}

const char *cli_model_dir(const char *option_value) {
    if (option_value) return option_value;
    const char *env = getenv("SDX4_MODEL");
    return env && *env ? env : NULL;
}

double cli_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ------------------------------------------------------------------------
 * Values
 * ------------------------------------------------------------------------ */

/* strtol and friends skip leading blanks and accept a sign; a strict
 * parser wants the string to start with the number itself. */
static int starts_like_number(const char *s, int allow_sign) {
    if (allow_sign && (*s == '-' || *s == '+')) s++;
    return isdigit((unsigned char)*s) || *s == '.';
}

static int parse_int(const cli_command *cmd, const cli_option *opt,
                     const char *text) {
    char *end;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (!starts_like_number(text, 1) || end == text || *end)
        return cli_usage_error(cmd, "%s: '%s' is not an integer", opt->name,
                               text);
    if (errno == ERANGE || v < opt->min || v > opt->max)
        return cli_usage_error(cmd, "%s: %s is out of range (%.0f..%.0f)",
                               opt->name, text, opt->min, opt->max);
    *(int *)opt->value = (int)v;
    return CLI_CONTINUE;
}

static int parse_float(const cli_command *cmd, const cli_option *opt,
                       const char *text) {
    char *end;
    errno = 0;
    double v = strtod(text, &end);
    if (!starts_like_number(text, 1) || end == text || *end)
        return cli_usage_error(cmd, "%s: '%s' is not a number", opt->name,
                               text);
    if (!isfinite(v) || errno == ERANGE)
        return cli_usage_error(cmd, "%s: '%s' is not a finite number",
                               opt->name, text);
    if (v < opt->min || v > opt->max)
        return cli_usage_error(cmd, "%s: %s is out of range (%g..%g)",
                               opt->name, text, opt->min, opt->max);
    *(double *)opt->value = v;
    return CLI_CONTINUE;
}

static int parse_seed(const cli_command *cmd, const cli_option *opt,
                      const char *text) {
    char *end;
    errno = 0;
    /* strtoull would wrap "-1" around to 2^64 - 1: no sign allowed. */
    unsigned long long v = strtoull(text, &end, 10);
    if (!isdigit((unsigned char)text[0]) || *end)
        return cli_usage_error(cmd, "%s: '%s' is not a non-negative integer",
                               opt->name, text);
    if (errno == ERANGE || v > SDX4_SEED_MAX)
        return cli_usage_error(cmd, "%s: %s is out of range (0..%lld)",
                               opt->name, text, (long long)SDX4_SEED_MAX);
    *(uint64_t *)opt->value = (uint64_t)v;
    return CLI_CONTINUE;
}

static int is_choice(const char *choices, const char *text) {
    size_t n = strlen(text);
    for (const char *c = choices; *c;) {
        size_t len = strcspn(c, "|");
        if (len == n && !strncmp(c, text, n)) return 1;
        c += len;
        if (*c == '|') c++;
    }
    return 0;
}

static int set_value(const cli_command *cmd, cli_option *opt,
                     const char *text) {
    opt->given = 1;
    switch (opt->kind) {
    case OPT_FLAG:
        *(int *)opt->value = 1;
        return CLI_CONTINUE;
    case OPT_STRING:
        if (!*text)
            return cli_usage_error(cmd, "%s: the value is empty", opt->name);
        *(const char **)opt->value = text;
        return CLI_CONTINUE;
    case OPT_TEXT:
        *(const char **)opt->value = text;
        return CLI_CONTINUE;
    case OPT_CHOICE:
        if (!is_choice(opt->choices, text))
            return cli_usage_error(cmd, "%s: '%s' is not one of %s",
                                   opt->name, text, opt->choices);
        *(const char **)opt->value = text;
        return CLI_CONTINUE;
    case OPT_INT:
        return parse_int(cmd, opt, text);
    case OPT_FLOAT:
        return parse_float(cmd, opt, text);
    case OPT_SEED:
        return parse_seed(cmd, opt, text);
    case OPT_LIST: {
        cli_list *list = opt->value;
        if (list->count == CLI_LIST_MAX)
            return cli_usage_error(cmd, "%s: at most %d times", opt->name, CLI_LIST_MAX);
        list->items[list->count++] = text;
        return CLI_CONTINUE;
    }
    }
    return cli_usage_error(cmd, "%s: unsupported option kind", opt->name);
}

/* ------------------------------------------------------------------------
 * The walk over argv
 * ------------------------------------------------------------------------ */

static cli_option *find_option(cli_command *cmd, const char *name,
                               size_t len) {
    for (cli_option *o = cmd->options; o && o->name; o++)
        if (strlen(o->name) == len && !strncmp(o->name, name, len)) return o;
    return NULL;
}

int cli_given(const cli_command *cmd, const char *name) {
    for (const cli_option *o = cmd->options; o && o->name; o++)
        if (!strcmp(o->name, name)) return o->given;
    return 0;
}

int cli_parse(cli_command *cmd, int argc, char **argv,
              const char **positionals, int *npositionals) {
    int n = 0, options_ended = 0;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (!options_ended && (!strcmp(arg, "--help") || !strcmp(arg, "-h"))) {
            fputs(cmd->help, stdout);
            return 0;
        }
        if (!options_ended && !strcmp(arg, "--")) {
            options_ended = 1;
            continue;
        }
        if (options_ended || arg[0] != '-' || !strcmp(arg, "-")) {
            if (n == cmd->max_positionals)
                return cli_usage_error(cmd, "unexpected argument '%s'", arg);
            positionals[n++] = arg;
            continue;
        }
        const char *eq = strchr(arg, '=');
        size_t name_len = eq ? (size_t)(eq - arg) : strlen(arg);
        cli_option *opt = find_option(cmd, arg, name_len);
        if (!opt)
            return cli_usage_error(cmd, "unknown option '%.*s'",
                                   (int)name_len, arg);
        const char *value;
        if (opt->kind == OPT_FLAG) {
            if (eq)
                return cli_usage_error(cmd, "%s takes no value", opt->name);
            value = "";
        } else if (eq) {
            value = eq + 1;
        } else if (i + 1 < argc) {
            value = argv[++i];
        } else {
            return cli_usage_error(cmd, "%s needs a value", opt->name);
        }
        int status = set_value(cmd, opt, value);
        if (status != CLI_CONTINUE) return status;
    }
    if (n < cmd->min_positionals)
        return cli_usage_error(cmd, "expected %s, got %d argument%s",
                               cmd->positionals, n, n == 1 ? "" : "s");
    *npositionals = n;
    return CLI_CONTINUE;
}

/* ------------------------------------------------------------------------
 * The CUDA settings' variables
 * ------------------------------------------------------------------------ */

/* A boolean variable as `sdx4 serve` reads its settings: 1 on, 0 off, -1
 * unset or empty, -2 anything else. */
static int variable_flag(const char *name) {
    static const char *const on[] = {"1", "true", "yes", "on"};
    static const char *const off[] = {"0", "false", "no", "off"};
    const char *v = getenv(name);
    if (!v || !*v) return -1;
    for (int i = 0; i < 4; i++) {
        if (!strcasecmp(v, on[i])) return 1;
        if (!strcasecmp(v, off[i])) return 0;
    }
    return -2;
}

int cli_cuda_environment(const cli_command *cmd, sdx4_cuda_options *cuda) {
    const struct {
        const char *name, *choices;
        const char **field;
    } texts[] = {
        {"SDX4_CUDA_DTYPE", CLI_CUDA_DTYPES, &cuda->dtype},
        {"SDX4_CUDA_VAE", CLI_CUDA_VAES, &cuda->vae},
        {"SDX4_CUDA_CONV", CLI_CUDA_CONVS, &cuda->conv},
    };
    for (int i = 0; i < 3; i++) {
        const char *v = getenv(texts[i].name);
        /* a flag wins; an empty variable is unset */
        if (*texts[i].field || !v || !*v) continue;
        if (!is_choice(texts[i].choices, v))
            return cli_usage_error(cmd, "%s: '%s' is not one of %s",
                                   texts[i].name, v, texts[i].choices);
        *texts[i].field = v;
    }
    const char *plan_cache = getenv("SDX4_PLAN_CACHE"); /* any path, or "off" */
    if (!cuda->plan_cache && plan_cache && *plan_cache) cuda->plan_cache = plan_cache;
    static char default_plan_cache[4096]; /* one command per process */
    if (!cuda->plan_cache && sdx4_default_plan_cache(default_plan_cache, sizeof default_plan_cache))
        cuda->plan_cache = default_plan_cache;
    const char *const flags[] = {"SDX4_CUDA_GRAPH", "SDX4_CUDA_PLAN",
                                 "SDX4_CUDA_PROFILE"};
    int value[3];
    for (int i = 0; i < 3; i++)
        if ((value[i] = variable_flag(flags[i])) == -2)
            return cli_usage_error(
                cmd, "%s: '%s' is not one of 1|0|true|false|yes|no|on|off",
                flags[i], getenv(flags[i]));
    cuda->no_graphs = value[0] == 0;
    cuda->no_plans = value[1] == 0;
    cuda->profile = value[2] == 1;
    return CLI_CONTINUE;
}

/* --scheduler-option key=value, repeated, as the JSON object of
 * scheduler_options (malloc'd; NULL when none was given or one is bad,
 * which *bad tells). A value is JSON (true, 3, "x") or else a string, so
 * algorithm_type=dpmsolver++ needs no quotes. */
char *cli_scheduler_options(const cli_command *cmd, const cli_list *list, int *bad) {
    *bad = 0;
    if (!list->count) return NULL;
    json_t *o = json_object();
    for (int i = 0; i < list->count; i++) {
        const char *item = list->items[i], *eq = strchr(item, '=');
        if (!eq || eq == item) {
            cli_usage_error(cmd, "--scheduler-option: '%s' is not key=value", item);
            *bad = 1;
            json_decref(o);
            return NULL;
        }
        char key[128];
        snprintf(key, sizeof key, "%.*s", (int)(eq - item), item);
        json_t *v = json_loads(eq + 1, JSON_DECODE_ANY, NULL);
        json_object_set_new(o, key, v ? v : json_string(eq + 1));
    }
    char *text = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    return text;
}
