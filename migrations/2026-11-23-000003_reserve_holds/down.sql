DROP FUNCTION reserve_holds(uuid[], uuid[], int8[], text[], interval);
