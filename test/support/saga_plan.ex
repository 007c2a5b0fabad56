defmodule Kuma.Test.SagaPlan do
  @moduledoc "The transfers of the saga crash test (test/kuma/saga_test.exs), the same in the child VM and the test."

  @doc "`transfers` transfers among `accounts` accounts: `{i, {from, to, amount}}`, always the same ones."
  @spec plan(pos_integer(), pos_integer()) :: [{pos_integer(), {String.t(), String.t(), pos_integer()}}]
  def plan(accounts, transfers) do
    state = :rand.seed_s(:exsss, {7, 7, 7})

    {plan, _} =
      Enum.map_reduce(1..transfers, state, fn i, st ->
        {a, st} = :rand.uniform_s(accounts, st)
        {b, st} = :rand.uniform_s(accounts - 1, st)
        b = if b >= a, do: b + 1, else: b
        {amount, st} = :rand.uniform_s(300, st)
        {{i, {"acct-#{a}", "acct-#{b}", amount}}, st}
      end)

    plan
  end
end
