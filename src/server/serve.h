/* serve.h - entry point of `sdx4 serve` (the HTTP service). */
#ifndef SDX4_SERVE_H
#define SDX4_SERVE_H

/* Runs the server with the arguments after "serve"; returns the process
 * exit status. */
int serve_main(int argc, char **argv);

#endif
