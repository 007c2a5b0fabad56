defmodule Kuma.SagaTest do
  # Sagas (Kuma.Saga) and the idempotent commands they are built on: the transfer saga of
  # examples/bank (loaded as it is) completes or compensates; a step sent twice, retried in
  # the same batch, or timed out is applied once; and 1,000 concurrent transfers with a
  # kill -9 in the middle all end completed or compensated, with no step applied twice
  # and the total of all balances unchanged.
  use Kuma.StoreCase, async: true

  alias Kuma.Test.ChildVM

  @bank Path.expand("../../examples/bank/bank.ex", __DIR__)
  Code.require_file(@bank)
  alias BankExample.{Account, Transfer}

  @moduletag store_opts: [aggregates: [BankExample.Account, Kuma.SagaTest.Slow]]

  defmodule Slow do
    @moduledoc false
    # A target that takes its time, then accepts or refuses.
    @behaviour Kuma.Aggregate
    @impl true
    def init(_id), do: 0
    @impl true
    def handle(_n, {:accept_after, ms}), do: Process.sleep(ms) && {:ok, [:accepted]}
    def handle(_n, {:refuse_after, ms}), do: Process.sleep(ms) && {:error, :refused_late}
    @impl true
    def apply(n, :accepted), do: n + 1
  end

  defmodule TransferStarter do
    @moduledoc false
    # A projection that starts a transfer saga for every {:transfer_requested, args} event,
    # with the saga's id derived from the event: handled twice, an event starts one saga.
    @behaviour Kuma.Projection
    @impl true
    def init(store), do: {:ok, store}
    @impl true
    def handle_event(%Kuma.Envelope{data: {:transfer_requested, args}} = e, store) do
      {:ok, _outcome} = Kuma.Saga.run(store, BankExample.Transfer, "from-event-" <> Kuma.Envelope.event_id(e), args)
      {:ok, store}
    end

    def handle_event(_other, store), do: {:ok, store}
  end

  defmodule SlowSaga do
    @moduledoc false
    @behaviour Kuma.Saga
    @impl true
    def steps(%{from: from, target: target, command: command}) do
      [
        {:debit, {BankExample.Account, from, {:withdraw, 10}}, {BankExample.Account, from, {:refund, 10}}},
        {:slow, {Kuma.SagaTest.Slow, target, command}}
      ]
    end
  end

  defp account(store, id), do: Kuma.entity(store, Account, id)

  defp open(store, id, balance, limit \\ 10_000),
    do: {:ok, _} = Kuma.execute(account(store, id), {:open, balance, limit})

  defp balance(store, id), do: Kuma.read(account(store, id)).balance

  describe "idempotent commands" do
    test "a command with an id already applied since since_seq writes nothing", %{store: store} do
      open(store, "i1", 100)
      a = account(store, "i1")
      assert {:ok, 2} = Kuma.execute(a, {:deposit, 5}, command_id: "c-1", since_seq: 1)
      assert {:ok, 2} = Kuma.execute(a, {:deposit, 5}, command_id: "c-1", since_seq: 1)
      assert balance(store, "i1") == 105
      assert {:ok, [_, %{metadata: %{command_id: "c-1"}}]} = Kuma.events(store, "i1")

      # Other ids, or an id applied before since_seq, are new commands.
      assert {:ok, 3} = Kuma.execute(a, {:deposit, 5}, command_id: "c-2", since_seq: 2)
      assert {:ok, 4} = Kuma.execute(a, {:deposit, 5}, command_id: "c-1", since_seq: 3)
      assert balance(store, "i1") == 115

      assert {:ok, true} = Kuma.applied?(a, "c-2", since_seq: 2)
      assert {:ok, false} = Kuma.applied?(a, "c-2", since_seq: 3)
      assert {:ok, false} = Kuma.applied?(a, "never")

      # Survives the entity's passivation: the ids are in the events, not in memory.
      :ok = Kuma.passivate(a)
      assert {:ok, 4} = Kuma.execute(a, {:deposit, 5}, command_id: "c-2", since_seq: 2)
      assert balance(store, "i1") == 115
    end

    test "the same command queued twice in one batch is applied once", %{store: store} do
      open(store, "i2", 0)
      a = account(store, "i2")

      # 50 callers at once, ten ids: the entity takes waiting writes together.
      results =
        1..50
        |> Enum.map(fn i ->
          Task.async(fn -> Kuma.execute(a, {:deposit, 1}, command_id: "dup-#{rem(i, 10)}", since_seq: 1) end)
        end)
        |> Task.await_many()

      assert Enum.all?(results, &match?({:ok, _}, &1))
      assert balance(store, "i2") == 10
      {:ok, events} = Kuma.events(store, "i2")
      ids = for %{metadata: %{command_id: id}} <- events, do: id
      assert Enum.sort(ids) == Enum.map(0..9, &"dup-#{&1}") |> Enum.sort()
    end

    test "a caller that gives up at once still leaves the entity knowing what it wrote", %{store: store} do
      open(store, "i4", 100)
      a = account(store, "i4")

      # The caller stops waiting at once; the entity waits for its commit regardless, so
      # the question asked after it has the true answer, and the entity's state is current.
      for i <- 1..20 do
        assert {:error, :timeout} = Kuma.execute(a, {:deposit, 1}, command_id: "late-#{i}", since_seq: i, timeout: 0)
        assert {:ok, true} = Kuma.applied?(a, "late-#{i}", since_seq: i)
      end

      assert balance(store, "i4") == 120
      assert {:ok, 22} = Kuma.execute(a, {:deposit, 1})
      assert {:ok, %{seq: 22}} = Kuma.head(store, "i4")
    end

    test "bad ids are refused and change nothing", %{store: store} do
      open(store, "i3", 1)
      a = account(store, "i3")
      assert {:error, {:invalid, :command_id, _}} = Kuma.execute(a, {:deposit, 1}, command_id: "")
      assert {:error, {:invalid, :command_id, _}} = Kuma.execute(a, {:deposit, 1}, command_id: :atom)

      assert {:error, {:invalid, :command_id, _}} =
               Kuma.execute(a, {:deposit, 1}, command_id: String.duplicate("x", 256))

      assert {:error, {:invalid, :since_seq, _}} = Kuma.execute(a, {:deposit, 1}, command_id: "x", since_seq: -1)
      assert {:error, {:invalid, :metadata, _}} = Kuma.execute(a, {:deposit, 1}, command_id: "x", metadata: [:list])
      assert {:error, {:invalid, :command_id, _}} = Kuma.applied?(a, "")
      # Appends have no command to deduplicate: the options are refused there.
      assert {:error, {:unknown_option, :command_id}} = Kuma.append(a, [{:deposited, 1}], command_id: "x")
      assert {:error, {:unknown_option, :since_seq}} = Kuma.append(store, "i3", [{:deposited, 1}], since_seq: 1)
      assert balance(store, "i3") == 1
    end
  end

  describe "the transfer saga" do
    test "completes, or refunds the debit when the credit is refused", %{store: store} do
      open(store, "a", 100)
      open(store, "b", 0, 50)
      open(store, "c", 0)
      {:ok, _} = Kuma.execute(account(store, "c"), :close)

      assert {:ok, :completed} = Kuma.Saga.run(store, Transfer, "t1", %{from: "a", to: "b", amount: 30})
      assert {balance(store, "a"), balance(store, "b")} == {70, 30}

      # Over b's limit: debited, then refunded.
      assert {:ok, {:compensated, :credit, :over_limit}} =
               Kuma.Saga.run(store, Transfer, "t2", %{from: "a", to: "b", amount: 40})

      assert {balance(store, "a"), balance(store, "b")} == {70, 30}
      {:ok, a_events} = Kuma.events(store, "a")
      assert [{:withdrawn, 40}, {:refunded, 40}] = a_events |> Enum.take(-2) |> Enum.map(& &1.data)

      # To a closed account; from an account without the money (nothing to undo).
      assert {:ok, {:compensated, :credit, :account_closed}} =
               Kuma.Saga.run(store, Transfer, "t3", %{from: "a", to: "c", amount: 1})

      assert {:ok, {:compensated, :debit, :insufficient_funds}} =
               Kuma.Saga.run(store, Transfer, "t4", %{from: "b", to: "a", amount: 31})

      assert {balance(store, "a"), balance(store, "b"), balance(store, "c")} == {70, 30, 0}

      # The saga's log is an entity's stream like any other.
      {:ok, log} = Kuma.events(store, "saga:t2")

      assert [
               {:saga_started, %{module: Transfer, args: %{amount: 40}}},
               {:step_sent, :run, 0, 2},
               {:step_done, :run, 0},
               {:step_sent, :run, 1, 2},
               {:step_failed, 1, :over_limit},
               {:step_sent, :undo, 0, 3},
               {:step_done, :undo, 0},
               {:saga_ended, :compensated}
             ] = Enum.map(log, & &1.data)

      # Run again with its id: the recorded saga answers, nothing is sent again.
      assert {:ok, :completed} = Kuma.Saga.run(store, Transfer, "t1", %{from: "a", to: "b", amount: 999})
      assert {balance(store, "a"), balance(store, "b")} == {70, 30}
      assert {:ok, %Kuma.Saga.Log{status: :completed}} = Kuma.Saga.status(store, "t1")
      assert {:ok, %Kuma.Saga.Log{status: :new}} = Kuma.Saga.status(store, "never")
    end

    test "steps that time out are settled, never applied twice nor compensated while they may apply", %{store: store} do
      for i <- 1..10, do: open(store, "s#{i}", 1_000, 1_200)

      # A timeout of 0: every call gives up at once while its command still runs; the
      # saga asks the target (after that command) whether it was applied.
      outcomes =
        for i <- 1..40 do
          Task.async(fn ->
            Kuma.Saga.run(
              store,
              Transfer,
              "slow-#{i}",
              %{from: "s#{rem(i, 10) + 1}", to: "s#{rem(i * 3, 10) + 1}", amount: 90},
              step_timeout: 0
            )
          end)
        end
        |> Task.await_many(30_000)

      assert Enum.all?(outcomes, &match?({:ok, _}, &1)), inspect(outcomes)
      assert Enum.sum(for i <- 1..10, do: balance(store, "s#{i}")) == 10_000
      assert_each_command_once(store, for(i <- 1..10, do: "s#{i}"))
    end
  end

  test "sagas started by events: an event handled twice starts one saga", %{store: store, name: name} do
    open(store, "e1", 100)
    open(store, "e2", 0)

    for amount <- [10, 20, 30],
        do: {:ok, _} = Kuma.append(store, "requests", {:transfer_requested, %{from: "e1", to: "e2", amount: amount}})

    # Twice from the first event (a checkpoint in memory starts over when restarted).
    for _ <- 1..2 do
      {:ok, _} =
        Kuma.Projection.start(store, TransferStarter, name: :"#{name}_starter", args: store, checkpoint: :memory)

      assert eventually(fn -> match?({:ok, %{lag: 0}}, Kuma.Projection.status(:"#{name}_starter")) end)
      :ok = Kuma.Projection.stop(:"#{name}_starter")
    end

    assert {balance(store, "e1"), balance(store, "e2")} == {40, 60}
    {:ok, resumed} = Kuma.Saga.resume(store)
    assert map_size(resumed) == 3 and Enum.all?(resumed, &match?({_, {:ok, :completed}}, &1))
  end

  describe "steps that time out" do
    test "applied late: the saga goes on; refused late: it compensates", %{store: store} do
      open(store, "f", 100)
      run = &Kuma.Saga.run(store, SlowSaga, &1, %{from: "f", target: "slow-1", command: &2}, step_timeout: 50)

      assert {:ok, :completed} = run.("late-ok", {:accept_after, 200})
      assert Kuma.read(Kuma.entity(store, Slow, "slow-1")) == 1
      assert balance(store, "f") == 90

      assert {:ok, {:compensated, :slow, :timeout}} = run.("late-no", {:refuse_after, 200})
      assert Kuma.read(Kuma.entity(store, Slow, "slow-1")) == 1
      assert balance(store, "f") == 90
    end

    test "an outcome that cannot be settled leaves the saga pending, and resume/2 finishes it", %{store: store} do
      open(store, "g", 100)
      args = %{from: "g", target: "slow-2", command: {:accept_after, 600}}
      opts = [step_timeout: 50, settle_timeout: 100]
      assert {:error, {:pending, "stuck"}} = Kuma.Saga.run(store, SlowSaga, "stuck", args, opts)

      assert {:ok, %Kuma.Saga.Log{status: :running, pending: %{phase: :run, index: 1}}} =
               Kuma.Saga.status(store, "stuck")

      {:ok, resumed} = Kuma.Saga.resume(store)
      assert resumed["stuck"] == {:ok, :completed}
      assert Kuma.read(Kuma.entity(store, Slow, "slow-2")) == 1
      assert balance(store, "g") == 90
    end
  end

  defp assert_each_command_once(store, accounts) do
    for id <- accounts do
      {:ok, events} = Kuma.events(store, id)
      ids = for %{metadata: %{command_id: c}} <- events, do: c
      assert ids == Enum.uniq(ids), "#{id} applied a command twice: #{inspect(ids -- Enum.uniq(ids))}"
    end
  end

  # -- kill -9 in the middle ------------------------------------------------------------------

  @accounts 100
  @transfers 1_000
  @start_balance 1_000

  @child_script ~S"""
  [dir, bank, accounts, transfers] = System.argv()
  Code.require_file(bank)
  {:ok, _} = Application.ensure_all_started(:kuma)
  {:ok, store} = Kuma.start(name: :saga_crash, data_dir: dir, shards: 4, aggregates: [BankExample.Account])
  IO.puts("PID #{System.pid()}")
  accounts = String.to_integer(accounts)

  for i <- 1..accounts do
    # Every tenth account is closed, every seventh has a low limit: refusals to compensate.
    a = Kuma.entity(store, BankExample.Account, "acct-#{i}")
    {:ok, _} = Kuma.execute(a, {:open, 1_000, if(rem(i, 7) == 0, do: 1_100, else: 100_000)})
    if rem(i, 10) == 0, do: {:ok, _} = Kuma.execute(a, :close)
  end

  IO.puts("OPENED")

  # acct-1's process is suspended: every saga that reaches it waits there with its step
  # sent and no outcome recorded. The first 400 transfers start at once; BURST goes out
  # when the others among them have had time to end, and the test kills the VM on reading
  # it: the kill finds sagas ended, sagas under way (those waiting on acct-1) and 600 not
  # begun, every time.
  {:ok, %{pid: held}} = Kuma.entity_info(Kuma.entity(store, BankExample.Account, "acct-1"))
  :sys.suspend(held)
  {first, rest} = Enum.split(Kuma.Test.SagaPlan.plan(accounts, String.to_integer(transfers)), 400)

  run = fn {i, {from, to, amount}} ->
    spawn(fn ->
      {:ok, outcome} = Kuma.Saga.run(store, BankExample.Transfer, "t-#{i}", %{from: from, to: to, amount: amount})
      IO.puts("DONE #{i} #{inspect(outcome)}")
    end)
  end

  Enum.each(first, run)
  Process.sleep(500)
  IO.puts("BURST")
  Enum.each(rest, fn t -> Process.sleep(2) && run.(t) end)
  Process.sleep(:infinity)
  """

  @tag store: false
  @tag timeout: 180_000
  test "1,000 concurrent transfers, kill -9 in the middle: after restart every saga ends, each step applied once, money kept",
       %{dir: dir, name: name} do
    {port, os_pid} = ChildVM.start(@child_script, [dir, @bank, "#{@accounts}", "#{@transfers}"])

    count = fn
      "DONE" <> _, {n, burst} -> {n + 1, burst}
      "BURST", {n, _} -> {n, true}
      _, acc -> acc
    end

    {_, true} = ChildVM.collect(port, {0, false}, count, &elem(&1, 1))

    ChildVM.kill(os_pid)
    {done, _} = ChildVM.drain(port, {0, true}, count)
    assert done < @transfers, "the kill came too late to interrupt anything"

    {:ok, store} = Kuma.start(name: name, data_dir: dir, shards: 4, aggregates: [Account])
    accounts = for i <- 1..@accounts, do: "acct-#{i}"

    under_way =
      Enum.count(1..@transfers, fn i ->
        match?(
          {:ok, %Kuma.Saga.Log{status: status}} when status in [:running, :compensating],
          Kuma.Saga.status(store, "t-#{i}")
        )
      end)

    assert under_way > 0, "the kill found no saga under way"

    # Sagas the child began are driven on from their logs...
    {:ok, resumed} = Kuma.Saga.resume(store)
    assert Enum.all?(resumed, &match?({_, {:ok, _}}, &1)), inspect(Enum.reject(resumed, &match?({_, {:ok, _}}, &1)))

    # ...and every transfer, begun or not, is run (begun ones answer their recorded end).
    outcomes =
      Kuma.Test.SagaPlan.plan(@accounts, @transfers)
      |> Task.async_stream(
        fn {i, {from, to, amount}} ->
          Kuma.Saga.run(store, Transfer, "t-#{i}", %{from: from, to: to, amount: amount})
        end,
        max_concurrency: 100,
        timeout: 60_000
      )
      |> Enum.map(fn {:ok, r} -> r end)

    IO.puts(
      "saga kill -9: #{done} transfers ended before the kill, #{map_size(resumed)} found begun, " <>
        "#{under_way} of them under way and resumed; " <>
        "outcomes #{inspect(Enum.frequencies_by(outcomes, &(elem(&1, 1) |> then(fn o -> if o == :completed, do: o, else: elem(o, 2) end))))}"
    )

    assert Enum.all?(outcomes, &(match?({:ok, :completed}, &1) or match?({:ok, {:compensated, _, _}}, &1)))
    assert Enum.count(outcomes, &match?({:ok, :completed}, &1)) > 100
    assert Enum.count(outcomes, &match?({:ok, {:compensated, :credit, _}}, &1)) > 10

    for i <- 1..@transfers do
      assert {:ok, %Kuma.Saga.Log{status: status}} = Kuma.Saga.status(store, "t-#{i}")
      assert status in [:completed, :compensated]
    end

    assert_each_command_once(store, accounts)
    assert Enum.sum(for(id <- accounts, do: balance(store, id))) == @accounts * @start_balance
    Kuma.stop(store)
  end
end
