# The transfer saga of the product pages, run against a real store: accounts as entities,
# transfers as sagas (debit, credit, refund the debit if the credit fails), all at once.
#
#     mix run examples/bank/transfers.exs [--data-dir DIR] [--transfers N]
#
# Each run opens ten accounts of its own (1,000 each, limit 1,500), closes one, and runs N
# transfers (default 200) concurrently between random accounts: transfers to the closed
# account, or that would push an account over its limit, are compensated. The total of all
# balances is the same before and after. (test/examples_test.exs runs it.)

Code.require_file("bank.ex", __DIR__)

defmodule BankExample.Main do
  alias BankExample.{Account, Transfer}

  def main(args) do
    {opts, _, _} = OptionParser.parse(args, strict: [data_dir: :string, transfers: :integer])
    dir = Path.expand(Keyword.get(opts, :data_dir, "data/bank"))
    n = Keyword.get(opts, :transfers, 200)
    master = if System.get_env("KUMA_MASTER_KEY") in [nil, ""], do: [master_key: :crypto.strong_rand_bytes(32)], else: []

    if master != [] and File.exists?(Path.join(dir, "KUMA")) do
      IO.puts("#{dir} holds a store whose key is not in KUMA_MASTER_KEY: give another --data-dir")
      System.halt(2)
    end

    {:ok, store} = Kuma.start([name: :bank, data_dir: dir, shards: 4, aggregates: [Account]] ++ master)
    run = System.os_time(:millisecond)
    accounts = for i <- 1..10, do: "acct-#{run}-#{i}"

    for id <- accounts, do: {:ok, _} = Kuma.execute(Kuma.entity(store, Account, id), {:open, 1_000, 1_500})
    {:ok, _} = Kuma.execute(Kuma.entity(store, Account, List.last(accounts)), :close)
    IO.puts("Opened #{length(accounts)} accounts of 1,000 (limit 1,500) in #{dir}; closed #{List.last(accounts)}")
    before = total(store, accounts)

    :rand.seed(:exsss, {1, 2, 3})

    transfers =
      for i <- 1..n do
        [from, to] = Enum.take_random(accounts, 2)
        {"transfer-#{run}-#{i}", %{from: from, to: to, amount: Enum.random(10..400)}}
      end

    {micros, outcomes} =
      :timer.tc(fn ->
        transfers
        |> Task.async_stream(fn {id, args} -> {id, Kuma.Saga.run(store, Transfer, id, args)} end, max_concurrency: 100)
        |> Enum.map(fn {:ok, r} -> r end)
      end)

    counts = Enum.frequencies_by(outcomes, fn {_, {:ok, o}} -> if o == :completed, do: :completed, else: elem(o, 2) end)
    IO.puts("#{n} transfers in #{div(micros, 1000)} ms: #{inspect(counts)}")

    {id, _} = Enum.find(outcomes, fn {_, {:ok, o}} -> o != :completed end) || hd(outcomes)
    {:ok, log} = Kuma.Saga.status(store, id)
    {:ok, events} = Kuma.events(store, "saga:" <> id)
    IO.puts("The log of #{id} (#{inspect(Kuma.Saga.Log.outcome(log))}):")
    for e <- events, do: IO.puts("  #{e.seq}. #{inspect(e.data)}")

    after_ = total(store, accounts)
    IO.puts("Total of all balances: #{before} before, #{after_} after#{if before == after_, do: " (unchanged)", else: " (CHANGED!)"}")
    Kuma.stop(store)
    if before != after_, do: System.halt(1)
  end

  defp total(store, accounts), do: accounts |> Enum.map(&Kuma.read(Kuma.entity(store, Account, &1)).balance) |> Enum.sum()
end

BankExample.Main.main(System.argv())
