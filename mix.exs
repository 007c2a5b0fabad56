defmodule Mix.Tasks.Compile.KumaNative do
  @moduledoc """
  Builds the Rust NIF (`native/kuma_nif`) with `cargo build --release` and installs it as
  `priv/native/libkuma_nif.so` of the app's build directory.

  Defined in mix.exs because it must run before the Elixir compiler, when nothing under
  `lib/` is compiled yet. Cargo runs only when a Rust source, a `Cargo.toml`, `Cargo.lock`
  or the feature set changed since the installed library was built; otherwise this is a
  file-time check. The test environment builds with the `fault-injection` feature so tests
  can provoke panics. hex and the `:rustler` Mix package are not used.
  """
  use Mix.Task.Compiler

  @lib "libkuma_nif.so"

  @impl true
  def run(_args) do
    root = Path.dirname(Mix.Project.project_file())
    priv = Path.join(Mix.Project.app_path(), "priv/native")
    installed = Path.join(priv, @lib)
    stamp = Path.join(priv, "build.stamp")
    features = if Mix.env() == :test, do: ["--features", "kuma_nif/fault-injection"], else: []
    wanted_stamp = Enum.join(["features:" | features], " ")

    sources =
      Path.wildcard(Path.join(root, "native/**/*.rs")) ++
        Path.wildcard(Path.join(root, "native/*/Cargo.toml")) ++
        [Path.join(root, "Cargo.toml"), Path.join(root, "Cargo.lock")]

    stale? =
      Mix.Utils.stale?(Enum.filter(sources, &File.exists?/1), [installed]) or
        File.read(stamp) != {:ok, wanted_stamp}

    if stale? do
      build(root, features)
      File.mkdir_p!(priv)
      built = Path.join(root, "target/release/#{@lib}")
      # Copy to a temporary name and rename: a running VM may have the old library mapped.
      tmp = installed <> ".tmp"
      File.cp!(built, tmp)
      File.rename!(tmp, installed)
      File.write!(stamp, wanted_stamp)
      Mix.shell().info("Installed #{Path.relative_to(installed, root)}")
      {:ok, []}
    else
      {:noop, []}
    end
  end

  defp build(root, features) do
    cargo = cargo_path()
    args = ["build", "--release", "-p", "kuma_nif"] ++ features
    Mix.shell().info("Building the Rust NIF: cargo #{Enum.join(args, " ")}")

    case System.cmd(cargo, args, cd: root, stderr_to_stdout: true, into: IO.stream(:stdio, :line)) do
      {_, 0} -> :ok
      {_, status} -> Mix.raise("cargo build failed with exit status #{status}")
    end
  end

  defp cargo_path do
    System.find_executable("cargo") ||
      Enum.find([Path.expand("~/.cargo/bin/cargo")], &File.exists?/1) ||
      Mix.raise("cargo not found: install Rust (https://rustup.rs) or put cargo on PATH")
  end
end

defmodule Mix.Tasks.Compile.KumaGleam do
  @moduledoc """
  Builds Kuma's Gleam package (`gleam/`) and the Gleam example (`examples/gleam_bank/`)
  with `gleam build --target erlang` when a `gleam` executable is on PATH, and puts their
  modules on the code path (`_build/<env>/gleam/ebin`, after Kuma's own), so that ExUnit
  can call them. Without `gleam` it does nothing: the Gleam tests then skip with one line
  saying so. No Gleam compiler is in any registry reachable where Kuma is built; Gleam
  v1.17.0 is the last whose output loads on OTP 25.
  """
  use Mix.Task.Compiler

  @projects [{"gleam", "kuma"}, {"examples/gleam_bank", "gleam_bank"}]

  @impl true
  def run(_args) do
    root = Path.dirname(Mix.Project.project_file())
    ebin = Path.join(Mix.Project.build_path(), "gleam/ebin")

    case System.find_executable("gleam") do
      nil ->
        {:noop, []}

      gleam ->
        built = Enum.map(@projects, &build(gleam, root, ebin, &1))
        Code.append_path(ebin)
        if Enum.any?(built, &(&1 == :ok)), do: {:ok, []}, else: {:noop, []}
    end
  end

  # Builds one Gleam project if a source changed since its beams were copied, and copies
  # its beams (not its .app file, which would shadow Kuma's own `kuma.app`).
  defp build(gleam, root, ebin, {dir, package}) do
    dir = Path.join(root, dir)
    stamp = Path.join(ebin, ".#{package}.stamp")
    sources = Path.wildcard(Path.join(dir, "{src,test}/**/*.gleam")) ++ [Path.join(dir, "gleam.toml")]

    if Mix.Utils.stale?(sources, [stamp]) do
      case System.cmd(gleam, ["build", "--target", "erlang"], cd: dir, stderr_to_stdout: true) do
        {_, 0} -> :ok
        {out, status} -> Mix.raise("gleam build in #{dir} failed (#{status}):\n#{out}")
      end

      File.mkdir_p!(ebin)

      for beam <- Path.wildcard(Path.join(dir, "build/dev/erlang/#{package}/ebin/*.beam")),
          do: File.cp!(beam, Path.join(ebin, Path.basename(beam)))

      File.write!(stamp, "")
      Mix.shell().info("Built the Gleam package in #{Path.relative_to(dir, root)}")
      :ok
    else
      :noop
    end
  end
end

defmodule Kuma.MixProject do
  use Mix.Project

  # ra (Raft, for cluster mode) and the applications it needs are not hex dependencies here:
  # bin/setup unpacks them from Debian into _ra/lib, and every mix command (iex -S mix,
  # mix test, mix run, mix bench) gets them on its code path. See docs/cluster.md.
  for ebin <- Path.wildcard(Path.join(__DIR__, "_ra/lib/*/ebin")), do: Code.prepend_path(ebin)

  def project do
    [
      app: :kuma,
      version: "0.1.0",
      elixir: "~> 1.14",
      start_permanent: Mix.env() == :prod,
      compilers: [:kuma_native] ++ Mix.compilers() ++ [:kuma_gleam],
      elixirc_paths: elixirc_paths(Mix.env()),
      deps: [],
      aliases: aliases(),
      test_coverage: [summary: [threshold: 0]],
      # ra is optional (cluster mode only) and not a hex dependency here: see above.
      xref: [exclude: [:ra, :ra_system, :ra_directory, :ra_env, :ra_log_wal, :ra_log_segment]],
      name: "Kuma",
      docs: [main: "readme"]
    ]
  end

  def application do
    [
      extra_applications: [:logger, :crypto],
      mod: {Kuma.Application, []}
    ]
  end

  defp elixirc_paths(:test), do: ["lib", "test/support"]
  defp elixirc_paths(_), do: ["lib"]

  defp aliases do
    [
      bench: ["run bench/run.exs"]
    ]
  end
end
