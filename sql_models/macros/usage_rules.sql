-- The counter rule, written once: the SQL models apply it to pairs of consecutive samples of a series;
-- billing_dags/fastpath.py is its compiled implementation, tested equal to the models.
-- (Loaded after exact_math.sql, whose exact_value it uses.)

-- rule 1: what a counter sample adds after the series' previous sample: v - v_prev, or v itself after a
-- reset (v < v_prev: the counter restarted from zero). Compared as stored (float64), added exactly.
create or replace macro counter_increase(value, prev_value) as
case
    when value >= prev_value then exact_value(value) - exact_value(prev_value)
    else exact_value(value)
end;

-- a counter sample below the series' previous sample: a reset
create or replace macro counter_reset(value, prev_value) as value < prev_value;
