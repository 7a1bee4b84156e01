#include "gateway/cli.hpp"

int main(int argc, char** argv) { return infergate::gateway::run_cli(argc, argv); }
