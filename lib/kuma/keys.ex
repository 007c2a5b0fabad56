defmodule Kuma.Keys do
  @moduledoc false
  # The master key: resolving it at start (Kuma.Store.Config) and rotating it
  # (`Kuma.rotate_master_key/2`). Data keys themselves live in the Rust keystore.

  alias Kuma.{Native, Store}

  @doc "A 32-byte key from raw bytes, 64 hex characters or base64."
  @spec parse(term()) :: {:ok, <<_::256>>} | :error
  def parse(<<key::binary-size(32)>>), do: {:ok, key}

  def parse(text) when is_binary(text) and byte_size(text) == 64 do
    case Base.decode16(text, case: :mixed) do
      {:ok, key} -> {:ok, key}
      :error -> :error
    end
  end

  def parse(text) when is_binary(text) do
    case Base.decode64(text) do
      {:ok, <<key::binary-size(32)>>} -> {:ok, key}
      _ -> :error
    end
  end

  def parse(_other), do: :error

  @doc "Rewraps every data key with `new_key` (see `Kuma.rotate_master_key/2`)."
  @spec rotate(Store.t(), term()) :: {:ok, %{keys: non_neg_integer()}} | {:error, term()}
  def rotate(%Store{} = s, new_key) do
    case parse(new_key) do
      {:ok, key} ->
        with {:ok, n} <- Native.keys_rotate(s.native, key), do: {:ok, %{keys: n}}

      :error ->
        {:error, {:invalid, :master_key, "a key must be 32 raw bytes, 64 hex characters or base64"}}
    end
  end
end
