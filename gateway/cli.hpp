// The `infergate` command line: serve (default), discover, config, --help, --version.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "config/config.hpp"

namespace infergate::gateway {

enum class Command { kServe, kDiscover, kConfig, kHelp, kVersion };

struct CliArgs {
  Command command = Command::kServe;
  bool json = false;  // discover --json
  config::LoadOptions load;
};

// Throws config::ConfigError with a one-line message on a bad flag.
CliArgs parse_args(const std::vector<std::string>& args);

std::string help_text();
std::string version_text();

// `text` as the characters of a JSON string (the JSON log's message): quotes, backslashes and
// control characters escaped, bytes that are not UTF-8 replaced by \ufffd.
std::string json_escaped(std::string_view text);

// Runs the whole program; returns the exit code (0 ok, 1 runtime failure, 2 bad input).
int run_cli(int argc, char** argv);

}  // namespace infergate::gateway
