-- (Re)seeds the benchmark backlog: 100,000 pending commands over the 50 bench masters, the same
-- rows in public.relay_commands_slave and bench.floor_queue. Mixed types (10% peristaltic, 20%
-- rule, 10% automation, 60% manual), priorities 0..100, created over the last ~17 minutes,
-- expiring an hour from now. TRUNCATEs both tables and the relay states: for the throwaway
-- benchmark database only (it refuses to run where other masters have commands).

do $$
begin
  if exists (select 1 from public.relay_commands_slave where master_device_id not like 'bench-master-%') then
    raise exception 'seed.sql truncates relay_commands_slave; this database has non-benchmark commands';
  end if;
end
$$;

truncate public.relay_commands_slave, bench.floor_queue restart identity;
delete from public.relay_slaves where master_device_id like 'bench-master-%';

insert into public.relay_commands_slave
  (master_device_id, slave_mac_address, slave_device_id, relay_numbers, actions, duration_seconds,
   command_type, triggered_by, priority, rule_id, rule_name, created_at, expires_at)
select 'bench-master-' || (1 + g % 50),
       '24:6F:28:' || upper(lpad(to_hex(1 + g % 50), 2, '0')) || ':00:' || upper(lpad(to_hex(g % 4), 2, '0')),
       'bench-slave-' || (1 + g % 50) || '-' || (g % 4),
       array[g % 8],
       array[case when g % 3 = 0 then 'off' else 'on' end],
       array[30 + g % 600],
       t.command_type,
       t.command_type,
       (g * 37) % 101,
       case when t.command_type = 'rule' then 'RULE_' || lpad((g % 20)::text, 3, '0') end,
       case when t.command_type = 'rule' then 'bench rule ' || (g % 20) end,
       now() - (100000 - g) * interval '10 milliseconds',
       now() + interval '1 hour'
  from generate_series(1, 100000) g,
       lateral (select case
                  when g % 10 = 0 then 'peristaltic'
                  when g % 10 in (1, 2) then 'rule'
                  when g % 10 = 3 then 'automation'
                  else 'manual'
                end as command_type) t;

insert into bench.floor_queue
  (id, client_id, master_device_id, user_email, master_mac_address, slave_device_id,
   slave_mac_address, relay_numbers, actions, duration_seconds, command_type, triggered_by,
   priority, rule_id, rule_name, status, created_at, updated_at, expires_at, locked_at, locked_by,
   delivery_count, sent_at, completed_at, execution_time_ms, error_message)
overriding system value
select id, client_id, master_device_id, user_email, master_mac_address, slave_device_id,
       slave_mac_address, relay_numbers, actions, duration_seconds, command_type, triggered_by,
       priority, rule_id, rule_name, status, created_at, updated_at, expires_at, locked_at, locked_by,
       delivery_count, sent_at, completed_at, execution_time_ms, error_message
  from public.relay_commands_slave;

vacuum analyze public.relay_commands_slave;
vacuum analyze bench.floor_queue;
vacuum analyze public.relay_slaves;
