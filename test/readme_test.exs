defmodule Kuma.ReadmeTest do
  # The README's usage example must run as written (with a temporary data dir).
  use ExUnit.Case, async: true

  test "the entities example runs" do
    readme = File.read!(Path.expand("../README.md", __DIR__))
    [_, code] = Regex.run(~r/### Entities and aggregates\s+```elixir\n(.*?)```/s, readme)
    dir = Path.join(System.tmp_dir!(), "kuma_readme_#{System.pid()}_#{System.unique_integer([:positive])}")
    on_exit(fn -> File.rm_rf!(dir) end)
    # The module is defined under a test-only name so it does not clash with test/support.
    code =
      code
      |> String.replace(~s(data_dir: "data"), ~s(data_dir: #{inspect(dir)}))
      |> String.replace("Bank.Account", "ReadmeBank.Account")
      |> String.replace("name: :ledger", "name: :readme_ledger")

    # Like iex: the module first, then the code that uses its struct.
    [module, rest] = String.split(code, "\n\n{:ok, store}", parts: 2)
    Code.eval_string(module)
    Code.eval_string("{:ok, store}" <> rest)
  end

  test "the README example runs" do
    readme = File.read!(Path.expand("../README.md", __DIR__))
    [_, code] = Regex.run(~r/## Using it.*?```elixir\n(.*?)```/s, readme)
    dir = Path.join(System.tmp_dir!(), "kuma_readme_#{System.unique_integer([:positive])}")
    on_exit(fn -> File.rm_rf!(dir) end)
    code = String.replace(code, ~s(data_dir: "data"), ~s(data_dir: #{inspect(dir)}))
    code = String.replace(code, "name: :bank", "name: :readme_bank")
    assert {:ok, _} = Kuma.Store.Config.validate(name: :readme_bank, data_dir: dir)
    Code.eval_string(code)
  end

  test "the sagas example runs" do
    readme = File.read!(Path.expand("../README.md", __DIR__))
    [_, code] = Regex.run(~r/### Sagas and idempotent commands\s+```elixir\n(.*?)```/s, readme)
    dir = Path.join(System.tmp_dir!(), "kuma_readme_#{System.unique_integer([:positive])}")
    on_exit(fn -> File.rm_rf!(dir) end)
    code = String.replace(code, ~s(data_dir: "data"), ~s(data_dir: #{inspect(dir)}))

    code =
      String.replace(
        code,
        ~s[Code.require_file("examples/bank/bank.ex")],
        ~s[Code.require_file(#{inspect(Path.expand("../examples/bank/bank.ex", __DIR__))})]
      )

    code = String.replace(code, "name: :payments", "name: :readme_payments")
    Code.eval_string(code)
  end

  test "the data protection example runs" do
    readme = File.read!(Path.expand("../README.md", __DIR__))
    [_, code] = Regex.run(~r/### Export, erasure and sensitive values\s+```elixir\n(.*?)```/s, readme)
    dir = Path.join(System.tmp_dir!(), "kuma_readme_#{System.unique_integer([:positive])}")
    on_exit(fn -> File.rm_rf!(dir) end)
    code = String.replace(code, ~s(data_dir: "data"), ~s(data_dir: #{inspect(dir)}))
    code = String.replace(code, "name: :shop", "name: :readme_shop")
    Code.eval_string(code)
  end

  test "the projections example runs" do
    readme = File.read!(Path.expand("../README.md", __DIR__))
    [_, code] = Regex.run(~r/### Projections, read models, subscriptions and queries\s+```elixir\n(.*?)```/s, readme)
    dir = Path.join(System.tmp_dir!(), "kuma_readme_#{System.unique_integer([:positive])}")
    on_exit(fn -> File.rm_rf!(dir) end)

    code =
      code
      |> String.replace(~s(data_dir: "data"), ~s(data_dir: #{inspect(dir)}))
      |> String.replace("name: :orders", "name: :readme_orders")
      |> String.replace("Shop.Revenue", "ReadmeShop.Revenue")

    [module, rest] = String.split(code, "\n\n{:ok, store}", parts: 2)
    Code.eval_string(module)
    Code.eval_string("{:ok, store}" <> rest)
    assert_receive {:kuma_event, %Kuma.Envelope{entity_id: "order-1"}}, 5_000
    assert_receive {:kuma_event, %Kuma.Envelope{entity_id: "order-2"}}, 5_000
  end
end
