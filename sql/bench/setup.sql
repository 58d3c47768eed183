-- Benchmark world for the command queue (issue 3): one owner, one edge agent, 50 masters assigned
-- to it, and bench.floor_queue, a copy of relay_commands_slave's shape (columns, defaults,
-- identity, generated type_rank, checks, indexes) with no RLS, no triggers and no foreign keys,
-- for the bare SKIP LOCKED dequeue the RPC is measured against. Idempotent; run as the superuser
-- on a throwaway database (tests/src/bin/bench-backend.rs does).

insert into auth.users (id, email)
values ('be000000-0000-0000-0000-00000000be01', 'bench@example.com')
on conflict (id) do nothing;

insert into public.edge_agents (agent_id, owner_id, name)
values ('bench-agent', 'be000000-0000-0000-0000-00000000be01', 'benchmark pi')
on conflict (agent_id) do nothing;

insert into public.device_status (device_id, owner_id, agent_id, device_type, mac_address, is_online)
select 'bench-master-' || m, 'be000000-0000-0000-0000-00000000be01', 'bench-agent', 'master',
       '24:6F:28:BE:00:' || upper(lpad(to_hex(m), 2, '0')), true
  from generate_series(1, 50) m
on conflict (device_id) do nothing;

create schema if not exists bench;
create table if not exists bench.floor_queue (like public.relay_commands_slave including all);
