defmodule Kuma.Test.ChildVM do
  @moduledoc """
  A separate BEAM that runs a script against this project's compiled code and prints
  lines, for the tests that `kill -9` a VM in the middle of its work. The script's first
  line of output must be `PID <os pid>`.
  """
  import ExUnit.Assertions, only: [flunk: 1]

  @doc "Writes `script` to a temporary file and runs it with `args`: `{port, os_pid}`."
  @spec start(String.t(), [String.t()]) :: {port(), String.t()}
  def start(script, args) do
    path = Path.join(System.tmp_dir!(), "kuma_child_#{System.unique_integer([:positive])}.exs")
    File.write!(path, script)
    ExUnit.Callbacks.on_exit(fn -> File.rm(path) end)
    ebin = Path.join(Mix.Project.app_path(), "ebin")
    opts = [:binary, :exit_status, {:line, 4096}, args: ["-pa", ebin, path | args]]
    port = Port.open({:spawn_executable, System.find_executable("elixir")}, opts)
    {port, pid_line(port)}
  end

  @doc "Kills the child with SIGKILL."
  @spec kill(String.t()) :: :ok
  def kill(os_pid) do
    {_, 0} = System.cmd("kill", ["-9", os_pid])
    :ok
  end

  @doc """
  Folds the child's lines into `acc` with `fun.(line, acc)` until `done?.(acc)`; fails the
  test if the child exits or goes quiet for a minute first.
  """
  @spec collect(port(), acc, (String.t(), acc -> acc), (acc -> boolean())) :: acc when acc: term()
  def collect(port, acc, fun, done?) do
    if done?.(acc) do
      acc
    else
      receive do
        {^port, {:data, {:eol, line}}} -> collect(port, fun.(line, acc), fun, done?)
        {^port, {:data, {:noeol, _}}} -> collect(port, acc, fun, done?)
        {^port, {:exit_status, status}} -> flunk("child exited early with #{status}")
      after
        60_000 -> flunk("child went quiet")
      end
    end
  end

  @doc "Folds the lines the child printed before it ended (or went quiet for 10 s)."
  @spec drain(port(), acc, (String.t(), acc -> acc)) :: acc when acc: term()
  def drain(port, acc, fun) do
    receive do
      {^port, {:data, {:eol, line}}} -> drain(port, fun.(line, acc), fun)
      {^port, {:data, {:noeol, _}}} -> drain(port, acc, fun)
      {^port, {:exit_status, _}} -> acc
    after
      10_000 -> acc
    end
  end

  defp pid_line(port) do
    receive do
      {^port, {:data, {:eol, "PID " <> pid}}} -> pid
      {^port, {:data, _}} -> pid_line(port)
      {^port, {:exit_status, status}} -> flunk("child exited early with #{status}")
    after
      60_000 -> flunk("child did not start")
    end
  end
end
